"""Worker faults through the daemon: OOM, a hung worker, a stdout flood, a full disk. Each gets
its exit class, retries and backoff as configured, and no partial output is ever shown as done."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import Harness, gpu_entry, wait_until
from tests.reliability.crashkill import BATCH_SECONDS, FAULT_WORKER, WORKER_EXTRA


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    """A harness whose worker is ``fault_worker.py`` (the job's tokenizer picks the fault)."""
    harness = Harness(
        tmp_path,
        worker_command=[sys.executable, str(FAULT_WORKER)],
        worker_extra_args=WORKER_EXTRA,
        default_batch_seconds=BATCH_SECONDS,
        retry_backoff_s=10.0,
        max_attempts=3,
        stop_grace_s=2.0,
    )
    harness.set_gpus([gpu_entry(0, 70)])
    return harness


def _start(h: Harness, name: str, **fields: object) -> str:
    job = h.submit(name, **fields)
    for _ in range(3):
        h.tick()
    assert h.state(job) == "running", h.job(job).reason
    return job


def _trail(h: Harness, job: str) -> list[str]:
    return [t["to_state"] for t in h.daemon.ledger.transitions(job)]


def test_oom_is_retried_with_doubling_backoff_then_fails(h: Harness) -> None:
    """Exit 75: deferred 10 s, then 20 s, then failed after max_attempts; class oom; no output."""
    job = _start(h, "oom", tokenizer="stub:oom")
    assert h.settle(job) == "deferred"
    rec = h.job(job)
    assert rec.exit_class == "oom" and rec.attempts == 1 and rec.not_before == rec.updated_at + 10
    assert "CUDA out of memory" in rec.reason
    h.tick(9)
    assert h.state(job) == "deferred"
    h.tick(2)
    assert h.settle(job) == "deferred"
    assert h.job(job).not_before - h.job(job).updated_at == pytest.approx(20)
    h.tick(21)
    assert h.settle(job) == "failed"
    assert h.job(job).attempts == 3 and "giving up" in h.job(job).reason
    assert _trail(h, job) == ["queued", "running", "deferred", "running", "deferred", "running",
                              "failed"]  # fmt: skip
    assert not (h.data / "oom.out.jsonl").exists()


def test_hung_worker_is_killed_at_its_own_timeout(h: Harness) -> None:
    """A worker ignoring SIGTERM, with timeout_s 5 in its job file: SIGTERM at 5 s, SIGKILL after
    stop_grace_s, its whole process group gone, class timeout; with max_attempts 1 it fails."""
    job = _start(h, "hang", tokenizer="stub:hang", timeout_s=5, max_attempts=1)
    pid = h.job(job).pid
    h.tick(4)
    assert h.state(job) == "running"
    h.tick(2)  # past the timeout: SIGTERM (ignored)
    time.sleep(0.3)
    assert psutil.pid_exists(pid) and h.state(job) == "running"
    h.tick(2.5)  # past the grace: SIGKILL
    assert h.settle(job) == "failed"
    rec = h.job(job)
    assert rec.exit_class == "timeout" and rec.reason.startswith("timed out after 5 s")
    assert not any(p.info["pid"] == pid for p in psutil.process_iter(["pid"])) or (
        psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    )
    assert not (h.data / "hang.out.jsonl").exists()


def test_stdout_flood_is_read_in_bounded_memory(h: Harness) -> None:
    """A worker writing 64 MiB of junk (long lines and no newlines) to stdout before finishing:
    the daemon's reads stay bounded (MAX_LOG_READ), the job ends done with its summary."""
    job = _start(h, "flood", tokenizer="stub:flood:64")
    tracemalloc.start()
    try:
        state = h.settle(job, timeout=60)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert state == "done"
    log_size = Path(h.job(job).log_path).stat().st_size
    assert log_size > 60 * 1024 * 1024
    print(f"flood: {log_size / 2**20:.0f} MiB of worker output, daemon peak {peak / 2**20:.1f} MiB")
    assert peak < 8 * 1024 * 1024
    assert h.job(job).progress.get("lines_done") == 1


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    got = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                         capture_output=True, text=True)  # fmt: skip
    if got.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {got.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_disk_full_stub_is_a_retried_crash_with_no_output(h: Harness, tmp_path: Path) -> None:
    """Writing into a full 256 KiB tmpfs: exit 1 (crash), retried with backoff, then failed;
    only OUT.partial ever exists, never OUT."""
    with _tmpfs(tmp_path / "full", "256k") as full:
        out = full / "out.jsonl"
        job = _start(h, "fill", tokenizer="stub:fill", output=str(out), max_attempts=2)
        assert h.settle(job) == "deferred"
        assert h.job(job).exit_class == "crash" and "No space left" in h.job(job).reason
        h.tick(11)
        assert h.settle(job) == "failed"
        assert not out.exists() and Path(str(out) + ".partial").exists()


def test_disk_full_real_worker_resumes_identically_after_space_returns(
    h: Harness, tmp_path: Path, tokenizer_dir: Path, audio_input: Path, reference_output: bytes
) -> None:
    """The real worker on a 16 KiB tmpfs: ENOSPC → exit 1, deferred, no OUT; space grows; the
    retry resumes and OUT equals an uninterrupted run's byte for byte."""
    with _tmpfs(tmp_path / "full", "16k") as full:
        out = full / "out.jsonl"
        job = h.submit("real", input=str(audio_input), output=str(out),
                       tokenizer=str(tokenizer_dir))  # fmt: skip
        for _ in range(3):
            h.tick()
        assert h.settle(job, timeout=180) == "deferred"
        rec = h.job(job)
        assert rec.exit_class == "crash" and "No space left on device" in rec.reason, rec.reason
        assert not out.exists()
        subprocess.run(["mount", "-o", "remount,size=4m", str(full)], check=True)
        h.tick(11)
        wait_until(lambda: h.state(job) == "running", 5)
        assert h.settle(job, timeout=180) == "done"
        assert out.read_bytes() == reference_output
        assert not list(full.glob("out.jsonl.partial*"))
