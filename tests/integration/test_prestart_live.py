"""``prestart`` in the real daemon with the real worker (simulated GPUs, the tiny tokenizer): the
worker starts while the GPU's reading settles, the same process then runs the job, and its
output is the same as a worker's started with its GPU."""

from __future__ import annotations

import json
from pathlib import Path

from gpuspool.extract.cli import RESTART_NOTE
from tests.conftest import gpu_entry
from tests.integration.conftest import LiveDaemon


def test_the_prestarted_worker_runs_the_job_and_writes_the_same_output(
    tmp_path: Path, audio_input: Path, tokenizer_dir: Path, reference_output: bytes
) -> None:
    # Eight polls of 0.5 s to settle: the worker's imports overlap the wait.
    live = LiveDaemon(tmp_path, prestart=True, stable_polls=8)
    live.set_gpus(gpu_entry(0, 50))
    live.start()
    job = live.submit(audio_input, tokenizer_dir)
    live.finishes_identically(job, reference_output)
    daemon_log = [json.loads(line) for line in live.log_path.read_text().splitlines()
                  if line.startswith("{")]  # fmt: skip
    (prestarted,) = [e for e in daemon_log if e["event"] == "job_prestarted"]
    (started,) = [e for e in daemon_log if e["event"] == "job_started"]
    assert started["pid"] == prestarted["pid"] and started["prestarted_s"] > 0
    job_log = (tmp_path / "state" / "logs" / f"{job}.log").read_text()
    assert RESTART_NOTE not in job_log
    in_job_log = [json.loads(line) for line in job_log.splitlines() if '"job_started"' in line]
    assert in_job_log and in_job_log[-1]["prestarted_s"] == started["prestarted_s"]
    events = (tmp_path / "state" / "events" / f"{job}.events").read_text().splitlines()
    (summary,) = [json.loads(e) for e in events if '"summary"' in e]
    assert summary["gate_wait_s"] > 0 and summary["import_s"] < summary["gate_wait_s"]
