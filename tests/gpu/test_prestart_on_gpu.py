"""``prestart`` on a real GPU: the worker imports with no GPU visible, CUDA does not start before
its go line (no second exec), and it then runs on the GPU the daemon chose, as a worker started
with its GPU does.

On the GPU machine: ``pytest -m gpu tests/gpu``. Skipped, with the reason, where NVML has no GPU.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gpuspool.extract.cli import RESTART_NOTE
from gpuspool.gpus import nvml_diagnostics
from tests.gpu.test_daemon_on_gpu import _events
from tests.integration.conftest import LiveDaemon, wait_state

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (nvml_diagnostics().ok and nvml_diagnostics().device_count > 0),
        reason="no NVIDIA GPU/NVML on this host",
    ),
]


def test_a_prestarted_worker_runs_on_the_gpu_the_daemon_chose(
    tmp_path: Path, audio_input: Path, tokenizer_dir: Path
) -> None:
    job_env = {"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}
    live = LiveDaemon(tmp_path, gpu_source="nvml", worker_device="cuda", min_free_gib=4.0,
                      max_attempts=1, job_env=job_env, prestart=True,
                      stable_polls=3)  # fmt: skip
    live.start()
    try:
        job = live.submit(audio_input, tokenizer_dir)
        state = wait_state(live, job, {"done", "failed"}, timeout=240)
        log = (live.tmp / "state" / "logs" / f"{job}.log").read_text()
        assert state == "done", (live.job(job), log[-4000:])
        record = live.job(job)
        (start,) = [e for e in _events(live, job) if e.get("event") == "start"]
        assert start["device_uuid"] == record.gpu_uuid  # seen from inside the worker
        started = [json.loads(line) for line in log.splitlines() if '"job_started"' in line]
        assert started and "prestarted_s" in started[-1]
        assert RESTART_NOTE not in log  # CUDA started after the go line, not during the imports
    finally:
        assert live.stop() == 0
