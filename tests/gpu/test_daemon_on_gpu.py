"""The real daemon on a real GPU: real NVML chooses the GPU, the real worker runs there (started
in ``/``, its environment allow-listed, its events on their own descriptor), and the worker's
own view of its device, from inside the process, is the GPU the daemon chose, whether the worker
started with its GPU or before it (``prestart``: a job only gets a prestarted worker while it waits
for its GPU's reading to settle, so there another process holds every GPU's memory until the job
is queued, then lets go).

On the GPU machine: ``pytest -m gpu tests/gpu``. Skipped, with the reason, where NVML has no GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gpuspool.extract.cli import RESTART_NOTE
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


#: Holds all but 1 GiB of every GPU (below the test's 4 GiB threshold) until its stdin closes.
HOLDER = """
import sys, torch
held = []
for i in range(torch.cuda.device_count()):
    free, _ = torch.cuda.mem_get_info(i)
    held.append(torch.empty(max(0, free - (1 << 30)), dtype=torch.uint8, device=f"cuda:{i}"))
print("held", flush=True)
sys.stdin.readline()
"""
#: Polls of 0.5 s before a GPU with room counts: the default's 10 s of settling.
SETTLE_POLLS = 20


def _waits_for_room(live: LiveDaemon, job_id: str) -> bool:
    record = live.job(job_id)
    return record is not None and "GiB available" in (record.reason or "")


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
                      stable_polls=SETTLE_POLLS if prestart else 3)  # fmt: skip
    holder, released = None, time.monotonic()
    if prestart:
        holder = subprocess.Popen([sys.executable, "-c", HOLDER], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    live.start()
    try:
        job = live.submit(audio_input, tokenizer_dir)
        if holder is not None:  # queued, its GPU full; then the GPU gets room
            wait_until(lambda: _waits_for_room(live, job), 60, 0.2)
            assert live.state(job) == "queued"
            holder.communicate("\n", timeout=60)
            released = time.monotonic()
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
        (summary,) = [e for e in _events(live, job) if e.get("event") == "summary"]
        if prestart:  # it waited at its gate, and its GPU was not given before it settled
            assert summary["gate_wait_s"] > 0
            assert started[-1]["prestarted_s"] > 0
            given = summary["startup_s"] - summary["gate_wait_s"]
            print(f"\nGPU given → first batch: {given:.2f} s (waited "
                  f"{summary['gate_wait_s']:.2f} s at its gate; job done "
                  f"{time.monotonic() - released:.1f} s after the GPU had room)")  # fmt: skip
        else:
            assert summary.get("gate_wait_s") is None
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
            holder.wait()
        assert live.stop() == 0
