"""The real daemon process, real SQLite, real worker subprocess and a ``file:`` GPU source."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.conftest import gpu_entry, wait_until
from tests.integration.conftest import LiveDaemon, wait_state


def test_waits_then_starts_within_stability_window(
    live: LiveDaemon, tokenizer_dir: Path, audio_input: Path, reference_output: bytes
) -> None:
    """Below the threshold the job waits; after free memory rises it starts within
    stable_polls × poll_interval_s + 1 s, and its output equals an uninterrupted run's."""
    live.start()
    job = live.submit(audio_input, tokenizer_dir)
    wait_until(lambda: live.state(job) == "queued" and "need 20.0" in (live.job(job).reason or ""))
    time.sleep(1.5)
    assert live.state(job) == "queued"
    raised_at = time.time()
    live.set_gpus(gpu_entry(0, 50))
    wait_state(live, job, {"running", "done"}, timeout=10)
    started = live.job(job).started_at
    assert started - raised_at <= 2 * 0.5 + 1.0
    assert wait_state(live, job, {"done", "failed"}) == "done"
    assert (live.tmp / "job.jsonl").read_bytes() == reference_output
    names = [e["event"] for e in live.events()]
    for event in ("job_accepted", "job_waiting", "job_started", "job_progress", "job_finished"):
        assert event in names
    started_event = next(e for e in live.events() if e["event"] == "job_started")
    assert started_event["gpu_uuid"] == "GPU-sim-0" and started_event["free_gib"] == 50.0
    assert live.stop() == 0


def test_kill9_daemon_mid_job_then_restart_finishes_identically(
    live: LiveDaemon, tokenizer_dir: Path, audio_input: Path, reference_output: bytes
) -> None:
    """SIGKILL of the daemon mid-job, then a restart: the job ends done, output identical."""
    job = live.start_job(audio_input, tokenizer_dir)
    wait_until(lambda: live.job(job) and live.job(job).progress.get("lines_done", 0) > 0, 120)
    worker = live.job(job).pid
    live.kill9()
    # The worker, in its own session, survives its daemon; kill it too, mid-run.
    os.killpg(worker, signal.SIGKILL)
    live.start()
    live.finishes_identically(job, reference_output)


def test_kill9_daemon_adopts_surviving_worker(
    live: LiveDaemon, tokenizer_dir: Path, audio_input: Path, reference_output: bytes
) -> None:
    """A worker that outlives a killed daemon is adopted on restart, never started twice."""
    job = live.start_job(audio_input, tokenizer_dir)
    wait_state(live, job, {"running"})
    # "running" is written just before the worker starts, its pid just after: wait for both.
    worker = wait_until(lambda: live.job(job).pid, timeout=30)
    live.kill9()
    live.start()
    assert wait_state(live, job, {"done", "failed"}) == "done"
    assert (live.tmp / "job.jsonl").read_bytes() == reference_output
    starts = [e for e in live.events() if e["event"] == "job_started"]
    assert len(starts) == 1 and starts[0]["pid"] == worker
    assert any(e["event"] == "job_adopted" for e in live.events())
    assert live.stop() == 0


def test_sigterm_interrupts_cleanly_and_job_resumes(
    live: LiveDaemon, tokenizer_dir: Path, audio_input: Path, reference_output: bytes
) -> None:
    """SIGTERM stops new starts, interrupts the running job (resumable) and exits 0."""
    job = live.start_job(audio_input, tokenizer_dir)
    wait_until(lambda: live.job(job) and live.job(job).progress.get("lines_done", 0) > 0, 120)
    assert live.stop() == 0
    assert live.state(job) in {"interrupted", "done"}
    live.start()
    live.finishes_identically(job, reference_output)
