"""Stray processes of finished jobs: killed, for every job that ended in a tick, in one pass over
the process table (a pass reads every process on the machine: tens of milliseconds)."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest
from structlog.testing import capture_logs

from tests.conftest import Harness, gpu_entry, wait_until


def _exited(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie not yet reaped by the daemon counts)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_strays_of_jobs_ending_together_are_killed_in_one_scan(tmp_path: Path) -> None:
    h = Harness(tmp_path, stable_polls=1)
    h.env["STUB_MODE"] = "stray"
    h.set_gpus([gpu_entry(i, 50) for i in range(3)])
    jobs = [h.submit(f"j{i}") for i in range(3)]
    h.tick()
    pids = [h.job(j).pid for j in jobs]
    assert all(h.state(j) == "running" for j in jobs) and None not in pids
    wait_until(lambda: all(_exited(p) for p in pids))
    strays = {
        p.pid
        for p in psutil.process_iter(["environ"])
        if (p.info["environ"] or {}).get("GPUSPOOL_JOB_ID") in jobs and p.pid not in pids
    }
    assert len(strays) == 3  # one sleeping child per job, each in a session of its own
    scans = [0]
    process_iter = psutil.process_iter

    def counted(*args: object, **kwargs: object) -> object:
        scans[0] += 1
        return process_iter(*args, **kwargs)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as mp, capture_logs() as logs:
        mp.setattr(psutil, "process_iter", counted)
        h.tick()
    assert all(h.state(j) == "done" for j in jobs)
    assert scans[0] == 1
    killed = {p for e in logs if e["event"] == "job_strays_killed" for p in e["pids"]}
    assert killed == strays
    wait_until(lambda: all(not psutil.pid_exists(p) or _exited(p) for p in strays))
    assert os.getpid() not in killed
