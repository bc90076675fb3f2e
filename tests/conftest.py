"""Shared fixtures: a daemon wired to a ``file:`` GPU source and a temp spool."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gpuspool.config import Settings
from gpuspool.daemon import Daemon
from gpuspool.gpus import FileProbe, write_gpu_file
from gpuspool.ledger_api import open_ledger
from gpuspool.runner import ProcessRunner, Runner
from gpuspool.runner_fake import FakeProcess, FakeRunner
from gpuspool.spool import Spool

STUB_WORKER = str(Path(__file__).parent / "stub_worker.py")
GIB_MIB = 1024.0


def gpu_entry(index: int, free_gib: float, total_gib: float = 80.0, **extra: Any) -> dict[str, Any]:
    return {"uuid": f"GPU-sim-{index}", "name": "Simulated 80GB", "total_mib": total_gib * GIB_MIB,
            "free_mib": free_gib * GIB_MIB, **extra}  # fmt: skip


def wait_until(cond: Callable[[], Any], timeout: float = 20.0, step: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"condition not met within {timeout} s")


def stub_script(proc: FakeProcess) -> None:
    """What tests/stub_worker.py does, for a :class:`FakeRunner` (``STUB_MODE`` in the job's
    environment picks the outcome; "sleep" runs until SIGTERM, then exits 143)."""
    mode = proc.launch.env.get("STUB_MODE", "ok")
    argv = list(proc.launch.argv)
    output = Path(argv[argv.index("--output") + 1])
    proc.emit("start", lines_total=4, device="cpu")
    proc.emit("progress", lines_done=1, lines_total=4, audio_s_done=2.0, audio_s_per_s=10.0,
              eta_s=0.6, gpu_peak_gib=None)  # fmt: skip
    if mode == "oom":
        proc.emit("error", exit_code=75, reason="CUDA out of memory (stub)")
        proc.exit(75)
    elif mode == "data":
        proc.emit("error", exit_code=65, reason="line 3: audio file missing", line=3)
        proc.exit(65)
    elif mode == "exists":
        proc.emit("error", exit_code=73, reason=f"output {output} exists")
        proc.exit(73)
    elif mode == "crash":
        proc.exit(1)
    elif mode == "ok":
        output.write_text(json.dumps({"audio": "a.wav", "audio_codes": [[1] * 16]}) + "\n")
        proc.emit("summary", lines_done=4, lines_skipped=0, audio_s_done=8.0, audio_s_per_s=10.0,
                  wall_s=0.8, peak_gpu_gib=1.5)  # fmt: skip
        proc.exit(0)


def real_runner(previous: Runner | None) -> Runner:
    return ProcessRunner()


def fake_runner(previous: Runner | None) -> Runner:
    """A scripted runner; a restarted daemon's shares the processes of the one before."""
    if isinstance(previous, FakeRunner):
        return previous.successor()
    return FakeRunner(stub_script)


class Harness:
    """A daemon with fake time, a file GPU source and a stub worker (a real process by default;
    ``make_runner=fake_runner`` scripts it without processes).

    ``env`` is the jobs' extra environment (the ``job_env`` setting, read at each start): tests
    set ``STUB_MODE`` there.
    """

    def __init__(
        self,
        tmp: Path,
        *,
        identity_for: Callable[[int], Any] | None = None,
        make_runner: Callable[[Runner | None], Runner] = real_runner,
        **overrides: Any,
    ) -> None:
        self.tmp = tmp
        self.identity_for = identity_for
        self.make_runner = make_runner
        self.runner: Runner | None = None
        self.gpu_file = tmp / "gpus.json"
        self.set_gpus([gpu_entry(0, 10)])
        self.environ: dict[str, str] = {"PATH": os.environ.get("PATH", "")}
        values: dict[str, Any] = {
            "spool_dir": tmp / "spool",
            "state_dir": tmp / "state",
            "poll_interval_s": 1.0,
            "stable_polls": 3,
            "min_free_gib": 20.0,
            "gpu_source": f"file:{self.gpu_file}",
            "worker_command": [sys.executable, STUB_WORKER],
            "worker_device": "cpu",
            "retry_backoff_s": 10.0,
            "stop_grace_s": 2.0,
            "progress_log_interval_s": 0.0,
            "scratch_dir": tmp / "scratch",
        }
        values.update(overrides)
        self.settings = Settings(**values)
        self.env: dict[str, str] = self.settings.job_env  # the same dict: read at each start
        self.data = tmp / "data"
        self.data.mkdir(exist_ok=True)
        (self.data / "in.jsonl").write_text('{"audio": "a.wav"}\n')
        self.now = 1000.0
        self.daemon = self.new_daemon()

    def new_daemon(self) -> Daemon:
        self.runner = self.make_runner(self.runner)
        d = Daemon(
            self.settings,
            ledger=open_ledger(self.settings),
            spool=Spool(self.settings.spool_dir),
            probe=FileProbe(self.gpu_file),
            runner=self.runner,
            environ=self.environ,
            daemon_euid=os.geteuid(),
            identity_for=self.identity_for,
        )
        d.startup(self.now)
        return d

    def set_gpus(self, gpus: list[dict[str, Any]]) -> None:
        write_gpu_file(self.gpu_file, gpus)

    def submit(self, name: str = "job", **fields: Any) -> str:
        data = {
            "input": str(self.data / "in.jsonl"),
            "output": str(self.data / f"{name}.out.jsonl"),
            "tokenizer": "tiny",
            "name": name,
            **fields,
        }
        _, job_id = Spool(self.settings.spool_dir).submit(data, stem=name)
        return job_id

    def drop_raw(self, filename: str, content: bytes) -> Path:
        staging = self.settings.staging_dir
        staging.mkdir(parents=True, exist_ok=True)
        (staging / filename).write_bytes(content)
        self.settings.incoming_dir.mkdir(parents=True, exist_ok=True)
        dest = self.settings.incoming_dir / filename
        os.rename(staging / filename, dest)
        return dest

    def start(self, mode: str, **fields: Any) -> str:
        """Submit job "a" with the stub worker in ``mode`` on a roomy GPU; tick until it starts."""
        self.env["STUB_MODE"] = mode
        self.set_gpus([gpu_entry(0, 50)])
        job = self.submit("a", **fields)
        for _ in range(3):
            self.tick()
        return job

    def tick(self, dt: float = 1.0, *, settle_intake: bool = True) -> Any:
        """One tick at fake time; by default intake is first run to completion (its scans are
        waited for here, in the test, so a submitted job is decided in this tick's report)."""
        self.now += dt
        if not settle_intake:
            return self.daemon.tick(self.now)
        early = self.settle_intake()
        report = self.daemon.tick(self.now)
        report.accepted[:0] = early.accepted
        report.rejected[:0] = early.rejected
        return report

    def settle_intake(self, timeout: float = 60.0) -> Any:
        """Run the daemon's intake at the current fake time until it has nothing left to do."""
        from gpuspool.daemon import TickReport

        report = TickReport()
        deadline = time.monotonic() + timeout
        while True:
            self.daemon.intake(self.now, report)
            if self.daemon.intake_stage.idle(self.now):
                return report
            if time.monotonic() > deadline:
                raise AssertionError("intake did not settle")
            time.sleep(0.01)

    def state(self, job_id: str) -> str:
        rec = self.daemon.ledger.get(job_id)
        assert rec is not None
        return rec.state.value

    def job(self, job_id: str) -> Any:
        return self.daemon.ledger.get(job_id)

    @property
    def fake(self) -> FakeRunner:
        """The scripted runner (``make_runner=fake_runner``)."""
        assert isinstance(self.runner, FakeRunner)
        return self.runner

    def settle(self, job_id: str, timeout: float = 20.0) -> str:
        """Tick (fake time) until the job leaves ``running``."""

        def done() -> bool:
            self.tick(0.1)
            return self.state(job_id) != "running"

        wait_until(done, timeout, step=0.05)
        return self.state(job_id)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight tokenizer saved with save_pretrained, built once per test run (in a
    child process, so this one needs not import torch)."""
    pytest.importorskip("qwen_tts")
    out = tmp_path_factory.mktemp("tiny-tokenizer") / "tiny"
    subprocess.run(
        [sys.executable, "-m", "gpuspool.extract.tiny", str(out)], check=True, capture_output=True
    )
    return out


@pytest.fixture(scope="session")
def audio_input(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 synthetic clips of 1–8 s and their input JSONL (the integration and GPU tests')."""
    from gpuspool.extract.synth import synth_dataset

    return synth_dataset(tmp_path_factory.mktemp("data"), 40, min_s=1.0, max_s=8.0, seed=11)


@pytest.fixture(scope="session")
def tokenizer_dir(tiny_tokenizer: Path) -> Path:
    """The tiny tokenizer, under the name the daemon-level tests use."""
    return tiny_tokenizer


def prestarting(tmp_path: Path, **overrides: Any) -> Harness:
    """A daemon with ``prestart`` on and scripted processes (``fake_runner``) whose jobs sleep
    until told otherwise (``STUB_MODE``)."""
    h = Harness(tmp_path, make_runner=fake_runner, **{"prestart": True, **overrides})
    h.env["STUB_MODE"] = "sleep"
    return h


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def json_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def worker_events(h: Harness, job_id: str) -> list[dict[str, Any]]:
    """The job's events as its worker wrote them to the daemon's channel."""
    return json_lines(h.daemon.events_path(job_id))
