"""The real daemon on a real GPU: real NVML chooses the GPU, the real worker runs there (started
in ``/``, its environment allow-listed, its events on their own descriptor), and the worker's
own view of its device, from inside the process, is the GPU the daemon chose, whether the worker
started with its GPU or before it (``prestart``).

On the GPU machine: ``pytest -m gpu tests/gpu``. Skipped, with the reason, where NVML has no GPU.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from gpuspool.extract.cli import RESTART_NOTE
from gpuspool.gpus import NvmlProbe, nvml_diagnostics
from tests.integration.conftest import LiveDaemon, wait_state

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (nvml_diagnostics().ok and nvml_diagnostics().device_count > 0),
        reason="no NVIDIA GPU/NVML on this host",
    ),
]


def _events(live: LiveDaemon, job_id: str) -> list[dict[str, Any]]:
    path = live.tmp / "state" / "events" / f"{job_id}.events"
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


@pytest.mark.parametrize("prestart", [False, True], ids=["started-with-its-gpu", "prestarted"])
def test_job_runs_on_the_gpu_the_daemon_chose(
    tmp_path: Path, audio_input: Path, tokenizer_dir: Path, prestart: bool
) -> None:
    """Prestarted, the worker imported with no GPU visible, and CUDA must not have started
    before its go line (no second exec): it then sees the GPU the go line named."""
    probe = NvmlProbe()
    try:
        uuids = {g.uuid for g in probe.poll().gpus}
    finally:
        probe.close()
    # A job's environment is an allow-list: an install found through PYTHONPATH (as on a GPU
    # host where the stack is unpacked beside the system Python) is handed on by job_env.
    job_env = {"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}
    live = LiveDaemon(tmp_path, gpu_source="nvml", worker_device="cuda", min_free_gib=4.0,
                      max_attempts=1, job_env=job_env, prestart=prestart,
                      stable_polls=3)  # fmt: skip
    live.start()
    try:
        job = live.submit(audio_input, tokenizer_dir)
        state = wait_state(live, job, {"done", "failed"}, timeout=240)
        log = live.tmp / "state" / "logs" / f"{job}.log"
        assert state == "done", (live.job(job), log.read_text()[-4000:] if log.exists() else "")
        record = live.job(job)
        assert record.gpu_uuid in uuids
        (start,) = [e for e in _events(live, job) if e.get("event") == "start"]
        assert start["device"].startswith("cuda")
        assert start["device_uuid"] == record.gpu_uuid  # seen from inside the worker
        lines = (tmp_path / "job.jsonl").read_text().splitlines()
        assert lines and all(json.loads(line)["audio_codes"] for line in lines)
        text = log.read_text()
        started = [json.loads(line) for line in text.splitlines() if '"job_started"' in line]
        assert started and ("prestarted_s" in started[-1]) == prestart
        assert RESTART_NOTE not in text
    finally:
        assert live.stop() == 0
