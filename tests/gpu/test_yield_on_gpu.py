"""Polite scavenging on a real GPU: the owner comes back and gets their memory.

A job of ours runs with the full-size random-weight tokenizer and a batch budget that makes it
hold more than ``total - 100 GiB``. A second process (not started by gpuspool) appears and
allocates 2 GiB every 0.1 s until it holds 100 GiB: without the yield it would run out of
memory. The daemon sees it in NVML's process list, stops the job (SIGTERM, checkpoint), and the
newcomer gets its 100 GiB without an out-of-memory error; once it is gone and the cool-down is
over, the job resumes on the same GPU and its output equals an uninterrupted run's. The time
from the newcomer's CUDA context appearing to our worker's memory being released is printed
(and appended to ``$GPUSPOOL_YIELD_RESULT`` when set, e.g. a file under ``bench/results/``).

On the GPU machine: ``pytest -m gpu -s tests/gpu/test_yield_on_gpu.py`` (about 2–3 minutes on
an H200). Skipped, with the reason, without NVML/CUDA or on a GPU smaller than 100 GiB plus
room for the job. The released tokenizer config is read from ``$CONFIG_DIR`` (as the bench
scripts do) when it has a ``config.json``; otherwise the config class's defaults (the released
encoder's dimensions: a Mimi encoder of 512 wide, 8 layers, 32 codebooks of 2048) are used.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpuspool.estimate import ACT_GIB_PER_MIN, CONTEXT_GIB, WEIGHTS_GIB, WORKSPACE_GIB
from gpuspool.gpus import NvmlProbe, nvml_diagnostics
from tests.conftest import wait_until
from tests.integration.conftest import LiveDaemon, wait_state

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (nvml_diagnostics().ok and nvml_diagnostics().device_count > 0),
        reason="no NVIDIA GPU/NVML on this host",
    ),
]

#: What the newcomer allocates: STEP_GIB every STEP_S until it holds TARGET_GIB.
TARGET_GIB = 100
STEP_GIB = 2
STEP_S = 0.1
#: How far past ``total - TARGET_GIB`` the job's memory goes, so the two cannot both fit.
OVERLAP_GIB = 10.0
#: How long the newcomer keeps its memory once it has it all.
HOLD_S = 2.0
POLL_S = 0.1
STABLE_POLLS = 2
COOLDOWN_S = 3.0
GIB = 1 << 30

#: The newcomer: torch imported ahead, a CUDA context when told (a line on stdin), then memory
#: step by step; one JSON line when it appeared and one of what it got.
NEWCOMER = f"""
import json, sys, time
import torch
print(json.dumps({{"event": "ready"}}), flush=True)
sys.stdin.readline()
torch.cuda.init()
torch.zeros(1, device="cuda")  # the context exists: NVML lists this process from now on
appeared = time.time()
print(json.dumps({{"event": "appeared", "at": appeared}}), flush=True)
held, oom = [], None
while len(held) * {STEP_GIB} < {TARGET_GIB}:
    try:
        held.append(torch.empty({STEP_GIB} * {GIB}, dtype=torch.uint8, device="cuda"))
    except torch.OutOfMemoryError as exc:
        oom = str(exc).splitlines()[0]
        break
    time.sleep({STEP_S})
got = time.time()
time.sleep({HOLD_S})
print(json.dumps({{"event": "done", "appeared": appeared, "got_all_at": got,
                   "held_gib": len(held) * {STEP_GIB}, "oom": oom}}), flush=True)
"""


def _first_gpu() -> tuple[str, float]:
    """The UUID and total GiB of the GPU the test uses (the first one)."""
    probe = NvmlProbe()
    try:
        gpus = probe.poll().gpus
    finally:
        probe.close()
    return (gpus[0].uuid, gpus[0].total_gib) if gpus else ("", 0.0)


def _budget_s(hold_gib: float) -> float:
    """The padded-seconds batch budget whose activations make the worker hold ``hold_gib``
    (the fp32 fit of ``estimate``, without its safety margin: what it really takes)."""
    fixed = WEIGHTS_GIB["fp32"] + CONTEXT_GIB + WORKSPACE_GIB
    return round(max(60.0, (hold_gib - fixed) / ACT_GIB_PER_MIN["fp32"] * 60.0))


@pytest.fixture(scope="module")
def full_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The released encoder with random weights, built once (682 MB from the released config;
    about 1 GB from the class defaults, whose decoder is larger: it stays on the CPU)."""
    pytest.importorskip("qwen_tts")
    from gpuspool.extract.tiny import build_full_tokenizer

    config_dir = Path(os.environ.get("CONFIG_DIR", ".bench-config"))
    if not (config_dir / "config.json").is_file():
        from qwen_tts.core.tokenizer_12hz.configuration_qwen3_tts_tokenizer_v2 import (
            Qwen3TTSTokenizerV2Config,
        )

        config_dir = tmp_path_factory.mktemp("config")
        defaults = Qwen3TTSTokenizerV2Config().to_dict()
        # The decoder's class has no default for it (the released config sets it); the decoder
        # never goes to the GPU, so its value changes nothing the test measures.
        defaults["decoder_config"].setdefault("codebook_dim", 512)
        (config_dir / "config.json").write_text(json.dumps(defaults, default=str))
    return build_full_tokenizer(tmp_path_factory.mktemp("tok") / "full", config_dir)


@pytest.fixture(scope="module")
def long_input(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 8 hours of audio from 48 clips of 20–30 s read 25 times each: a dozen batches, so
    the job is far from done when the newcomer comes, yet a whole run takes about 15 s of GPU
    time (24 kHz mono WAV: cheap to load)."""
    from gpuspool.extract.synth import synth_dataset

    folder = tmp_path_factory.mktemp("long")
    once = synth_dataset(folder, 48, min_s=20.0, max_s=30.0, seed=3, formats=["wav"],
                         sample_rates=[24000], stereo_fraction=0.0,
                         workers=min(8, os.cpu_count() or 1))  # fmt: skip
    lines = once.read_text().splitlines()
    repeated = folder / "repeated.jsonl"
    repeated.write_text("".join(f"{line}\n" for _ in range(25) for line in lines))
    return repeated


def _worker_argv(inp: Path, out: Path, tokenizer: Path, budget_s: float) -> list[str]:
    return [sys.executable, "-m", "gpuspool.extract", "--input", str(inp), "--output", str(out),
            "--tokenizer", str(tokenizer), "--device", "cuda", "--batch-seconds", f"{budget_s:g}",
            "--on-bad-line", "fail", "--dtype", "fp32"]  # fmt: skip


class GpuWatch:
    """Polls NVML every 20 ms on a thread: which pids held memory on the test's GPU at each
    poll, and how much."""

    def __init__(self) -> None:
        self.uuid = _first_gpu()[0]
        self.seen: list[tuple[float, dict[int, float]]] = []
        self._stop = threading.Event()
        self._probe = NvmlProbe()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            gpus = self._probe.poll().gpus
            gpu = next((g for g in gpus if g.uuid == self.uuid), None)
            if gpu is not None and gpu.healthy:  # a failed poll says nothing about who is there
                used = {p.pid: (p.used_mib or 0.0) / 1024.0 for p in gpu.processes}
                self.seen.append((time.time(), used))
            time.sleep(0.02)

    def used_gib(self, pid: int) -> float:
        return self.seen[-1][1].get(pid, 0.0) if self.seen else 0.0

    def gone_after(self, pid: int, t: float) -> float | None:
        """The first poll after ``t`` where ``pid`` holds no GPU memory any more."""
        return next((at for at, used in self.seen if at > t and pid not in used), None)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._probe.close()


@pytest.fixture
def gpu_watch() -> Iterator[GpuWatch]:
    watch = GpuWatch()
    yield watch
    watch.close()


def _job_env() -> dict[str, str]:
    return {"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}


def test_job_yields_and_the_owner_gets_its_memory(
    tmp_path: Path, full_tokenizer: Path, long_input: Path, gpu_watch: GpuWatch
) -> None:
    uuid, total = _first_gpu()
    on_it = {**os.environ, "CUDA_VISIBLE_DEVICES": uuid, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    hold = total - TARGET_GIB + OVERLAP_GIB
    if hold < 8.0 or hold > total - 8.0:
        pytest.skip(f"needs a GPU of at least {TARGET_GIB + OVERLAP_GIB + 8:.0f} GiB; "
                    f"this one has {total:.1f} GiB")  # fmt: skip
    budget = _budget_s(hold)
    reference = tmp_path / "reference.jsonl"
    subprocess.run(_worker_argv(long_input, reference, full_tokenizer, budget), check=True,
                   capture_output=True, timeout=600, env=on_it)  # fmt: skip

    live = LiveDaemon(
        tmp_path, gpu_source="nvml", worker_device="cuda", poll_interval_s=POLL_S,
        stable_polls=STABLE_POLLS, stop_grace_s=20.0, max_attempts=1, job_env=_job_env(),
        yield_on_foreign_process=True, yield_cooldown_s=COOLDOWN_S,
    )  # fmt: skip
    live.start()
    newcomer: subprocess.Popen[str] | None = None
    try:
        job = live.submit(long_input, full_tokenizer, min_free_gib="auto", batch_seconds=budget,
                          gpus=[uuid])  # fmt: skip
        wait_state(live, job, {"running"}, timeout=120)
        pid = wait_until(lambda: live.job(job).pid, timeout=30)
        pipes: dict[str, Any] = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE,
                                 "stderr": subprocess.PIPE}  # fmt: skip
        newcomer = subprocess.Popen([sys.executable, "-c", NEWCOMER], text=True, env=on_it,
                                    **pipes)  # fmt: skip
        assert newcomer.stdin is not None and newcomer.stdout is not None
        assert json.loads(newcomer.stdout.readline() or "{}").get("event") == "ready"
        # The job has done a batch, so it holds its batch memory (the caching allocator keeps
        # its peak), and is far from done: the two cannot both fit.
        wait_until(lambda: live.job(job).progress.get("lines_done", 0) > 0, 180, 0.1)
        time.sleep(0.5)
        rec = live.job(job)
        assert rec.state.value == "running"
        assert rec.progress.get("lines_done", 0) < rec.progress.get("lines_total", 1) / 2, rec
        used = gpu_watch.used_gib(pid)
        assert used + TARGET_GIB > total, f"no conflict (job holds {used:.1f} GiB): raise OVERLAP"

        newcomer.stdin.write("go\n")
        newcomer.stdin.flush()
        first = json.loads(newcomer.stdout.readline() or "{}")
        assert first.get("event") == "appeared", newcomer.stderr.read() if newcomer.stderr else ""
        out, err = newcomer.communicate(timeout=120)
        assert newcomer.returncode == 0, err[-3000:]
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        released = gpu_watch.gone_after(pid, first["at"])
        seconds = None if released is None else round(released - first["at"], 2)
        line = (f"yield on a {total:.0f} GiB GPU: job held {gpu_watch_peak(gpu_watch, pid):.1f}"
                f" GiB; newcomer appeared -> our memory released in {seconds} s (poll {POLL_S} s"
                f" x {STABLE_POLLS}); newcomer asked {TARGET_GIB} GiB ({STEP_GIB} GiB / {STEP_S}"
                f" s), got {result['held_gib']} GiB, out of memory: {result['oom']}")  # fmt: skip
        print("\n" + line)
        if os.environ.get("GPUSPOOL_YIELD_RESULT"):
            with open(os.environ["GPUSPOOL_YIELD_RESULT"], "a", encoding="utf-8") as f:
                f.write(line + "\n")
        assert result["oom"] is None and result["held_gib"] >= TARGET_GIB, result
        assert seconds is not None
        yielded = live.job(job)
        assert yielded.yields == 1 and yielded.attempts == 0, yielded
        assert yielded.last_yield["pid"] == newcomer.pid

        state = wait_state(live, job, {"done", "failed"}, timeout=300)
        log = live.tmp / "state" / "logs" / f"{job}.log"
        assert state == "done", (live.job(job), log.read_text()[-4000:] if log.exists() else "")
        assert (live.tmp / "job.jsonl").read_bytes() == reference.read_bytes()
        assert (
            live.job(job).gpu_uuid == uuid == yielded.last_yield["gpu_uuid"]
        )  # after the cool-down
    finally:
        if newcomer is not None and newcomer.poll() is None:
            newcomer.kill()
            newcomer.wait()
        assert live.stop() == 0


def gpu_watch_peak(watch: GpuWatch, pid: int) -> float:
    return max((used.get(pid, 0.0) for _, used in watch.seen), default=0.0)
