"""What a worker learns of its attempt, and a host that cannot see a job's input.

Two daemons on one PostgreSQL, in this process (fake time), with real worker processes. Host b
runs the real extraction worker inside a mount namespace where an empty tmpfs hides the shared
data folder: a host without the shared filesystem mounted (docs/cluster.md).
"""
# ruff: noqa: E402 - the driver check runs before the imports that need the driver

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.pgserver import require_driver

require_driver()

from gpuspool.protocol import FENCE_ENV, HOST_ENV
from tests.cluster.test_daemon_pg import audit, host
from tests.conftest import gpu_entry


def _probe(h: Any, job_id: str) -> dict[str, Any]:
    """What the stub worker in ``probe`` mode saw (its line in the job's human log)."""
    for line in Path(h.job(job_id).log_path).read_text().splitlines():
        if line.startswith('{"probe"'):
            return dict(json.loads(line)["probe"])
    raise AssertionError("no probe line in the job's log")


def test_the_worker_is_handed_its_attempt(tmp_path: Path, pg_url: str) -> None:
    """On a shared ledger the worker gets the claim's fencing token and the host's name, which
    the job's own configured environment cannot override."""
    a = host(tmp_path, pg_url, "a")
    a.env.update({"STUB_MODE": "probe", FENCE_ENV: "999", HOST_ENV: "forged"})
    job = a.submit("p")
    a.tick()
    assert a.settle(job) == "done"
    environ = _probe(a, job)["environ"]
    assert environ[FENCE_ENV] == str(a.job(job).fence) and environ[HOST_ENV] == "a"


def _two_hosts_b_blind(tmp_path: Path, pg_url: str) -> tuple[Any, Any]:
    """Hosts a and b; b runs the real extraction worker where a's data folder (which the jobs
    submitted on a name) is an empty tmpfs."""
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) for a mount namespace")
    # Long enough that a, ticked only now and then here, stays a live host.
    a = host(tmp_path, pg_url, "a", host_timeout_s=60)
    blind = [
        unshare, "--mount", "--propagation", "private", "sh", "-c",
        'mount -t tmpfs hidden "$0" && exec "$@"', str(a.data),
        sys.executable, "-m", "gpuspool.extract",
    ]  # fmt: skip
    return a, host(tmp_path, pg_url, "b", worker_command=blind, host_timeout_s=60)


def test_a_host_without_the_input_leaves_the_job_to_one_that_has_it(
    tmp_path: Path, pg_url: str
) -> None:
    a, b = _two_hosts_b_blind(tmp_path, pg_url)
    a.set_gpus([gpu_entry(0, 0)])  # a is full: b claims the job first
    a.env["STUB_MODE"] = "ok"
    job = a.submit("seen-on-a-only")
    a.tick()
    assert a.state(job) == "queued"
    b.tick()
    assert b.job(job).host == "b"
    assert b.settle(job, timeout=60) == "deferred"
    rec = b.job(job)
    data = a.data / "in.jsonl"
    assert rec.reason.startswith(f"input not visible on host b: input {data} not found on host b")
    assert "docs/cluster.md" in rec.reason and rec.reason.endswith("waits for another host")
    assert rec.attempts == 0  # not the job's fault: no attempt counted
    for _ in range(3):  # past the backoff: b never takes it again
        b.tick(30)
        assert b.state(job) == "deferred"
    assert b.job(job).reason == rec.reason
    a.set_gpus([gpu_entry(0, 50)])
    a.tick(30)
    assert a.job(job).host == "a"
    assert a.settle(job) == "done"
    trail = [(t["to_state"], t["host"]) for t in audit(pg_url, job)]
    assert trail == [("queued", "a"), ("running", "b"), ("deferred", "b"), ("running", "a"),
                     ("done", "a")]  # fmt: skip


def test_no_host_left_that_may_see_the_input_fails_the_job(tmp_path: Path, pg_url: str) -> None:
    """The job may run on b alone (its hosts list): b not finding the input fails it at once,
    with the host, the path and where the requirement is written."""
    a, b = _two_hosts_b_blind(tmp_path, pg_url)
    job = a.submit("b-only", hosts=["b"])
    a.tick()
    b.tick()
    assert b.settle(job, timeout=60) == "failed"
    reason = b.job(job).reason
    assert reason.startswith("input not visible on host b: input ")
    assert "docs/cluster.md" in reason
    assert reason.endswith("no other host that may run it is left to try (b did not find it)")
    assert b.job(job).exit_class == "no_input"
