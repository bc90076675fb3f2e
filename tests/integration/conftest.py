"""The real daemon as a subprocess, with a ``file:`` GPU source and the real worker (CPU)."""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpuspool.gpus import write_gpu_file
from gpuspool.ledger import Ledger
from gpuspool.spool import Spool
from tests.conftest import gpu_entry, wait_until


@pytest.fixture(scope="session")
def reference_output(
    tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path, audio_input: Path
) -> bytes:
    """The output of one uninterrupted run of the worker, as the daemon would start it."""
    out = tmp_path_factory.mktemp("ref") / "ref.jsonl"
    subprocess.run(
        [sys.executable, "-m", "gpuspool.extract", "--input", str(audio_input), "--output",
         str(out), "--tokenizer", str(tokenizer_dir), "--device", "cpu", "--batch-seconds",
         "60", "--on-bad-line", "fail", "--dtype", "fp32"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return out.read_bytes()


def _toml(value: Any) -> str:
    """A config value as TOML: JSON for scalars and lists, an inline table for a mapping."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


class LiveDaemon:
    """A ``gpuspool daemon`` process and the files it works on."""

    def __init__(self, tmp: Path, **config: Any) -> None:
        self.tmp = tmp
        self.gpu_file = tmp / "gpus.json"
        write_gpu_file(self.gpu_file, [gpu_entry(0, 10)])
        values: dict[str, Any] = {
            "spool_dir": str(tmp / "spool"),
            "state_dir": str(tmp / "state"),
            "scratch_dir": str(tmp / "scratch"),
            "gpu_source": f"file:{self.gpu_file}",
            "poll_interval_s": 0.5,
            "stable_polls": 2,
            "min_free_gib": 20.0,
            "worker_device": "cpu",
            "stop_grace_s": 10.0,
            "progress_log_interval_s": 0.0,
            "default_batch_seconds": 60.0,
            "log_format": "json",
            "worker_extra_args": ["--progress-interval-s", "0.2"],
            "allow_root_jobs": os.geteuid() == 0,
        }
        values.update(config)
        self.config = tmp / "gpuspool.toml"
        self.config.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in values.items()))
        self.log_path = tmp / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.spool = Spool(tmp / "spool")
        self.ledger_path = tmp / "state" / "ledger.sqlite3"

    def start(self, env: dict[str, str] | None = None, *, wait: bool = True) -> None:
        """Start ``gpuspool daemon`` (with ``env``, else ours); ``wait`` for its first log line."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpuspool.cli", "--config", str(self.config), "daemon"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()
        if wait:
            wait_until(lambda: "daemon_started" in self.log_path.read_text(), timeout=30)

    def set_gpus(self, *gpus: dict[str, Any]) -> None:
        write_gpu_file(self.gpu_file, list(gpus))

    def submit(self, audio_input: Path, tokenizer: Path, name: str = "job", **extra: Any) -> str:
        data = {"input": str(audio_input), "output": str(self.tmp / f"{name}.jsonl"),
                "tokenizer": str(tokenizer), "name": name, **extra}  # fmt: skip
        _, job_id = self.spool.submit(data, stem=name)
        return job_id

    def start_job(self, audio_input: Path, tokenizer: Path) -> str:
        """Start the daemon with a roomy GPU and submit one job."""
        self.set_gpus(gpu_entry(0, 50))
        self.start()
        return self.submit(audio_input, tokenizer)

    def finishes_identically(self, job_id: str, reference: bytes) -> None:
        """The job ends done, its output equals an uninterrupted run's, the daemon stops with 0."""
        assert wait_state(self, job_id, {"done", "failed"}) == "done"
        assert (self.tmp / "job.jsonl").read_bytes() == reference
        assert self.stop() == 0

    def job(self, job_id: str) -> Any:
        if not self.ledger_path.exists():
            return None
        ledger = Ledger(self.ledger_path, readonly=True)
        try:
            return ledger.get(job_id)
        finally:
            ledger.close()

    def state(self, job_id: str) -> str | None:
        rec = self.job(job_id)
        return None if rec is None else rec.state.value

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveDaemon]:
    d = LiveDaemon(tmp_path)
    yield d
    if d.proc is not None and d.proc.poll() is None:
        d.proc.kill()
        d.proc.wait()


def wait_state(d: LiveDaemon, job_id: str, states: set[str], timeout: float = 120) -> str:
    return str(wait_until(lambda: d.state(job_id) in states and d.state(job_id), timeout, 0.1))


#: The unprivileged system user of the privilege tests.
TEST_USER = "gpuspool-test"


def ensure_test_user() -> pwd.struct_passwd:
    """:data:`TEST_USER`, created as a system user without a home or shell if missing."""
    try:
        return pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_USER],
            check=True,
        )
        return pwd.getpwnam(TEST_USER)
