"""Waiting reasons on a shared ledger with several hosts: each host keeps its own view of each
waiting job, and what ``gpuspool status`` shows is the nearest live host's, whichever host
wrote last."""
# ruff: noqa: E402 - the driver check runs before the imports that need the driver

from __future__ import annotations

import time
from pathlib import Path

from tests.pgserver import require_driver

require_driver()

import psycopg

from gpuspool.daemon import REASON_FIGURES_EVERY_S
from tests.cluster.test_daemon_pg import TIMEOUT_S, host
from tests.conftest import gpu_entry


def rows_of(url: str, job_id: str) -> dict[str, str]:
    with psycopg.connect(url) as db:
        found = db.execute(
            "SELECT host, reason FROM host_reasons WHERE job_id = %s", (job_id,)
        ).fetchall()
    return dict(found)


def test_status_shows_the_nearest_hosts_reason_not_the_last_writers(
    tmp_path: Path, pg_url: str
) -> None:
    a, b = host(tmp_path, pg_url, "a"), host(tmp_path, pg_url, "b")
    a.set_gpus([gpu_entry(0, 10)]), b.set_gpus([gpu_entry(0, 15)])  # need 20
    job = a.submit("j")
    a.tick(), b.tick()  # a takes the job in, b sees it
    a.set_gpus([gpu_entry(0, 12)])
    a.tick(REASON_FIGURES_EVERY_S)  # a writes last (its figures moved)
    assert a.job(job).reason.startswith("host b: GPU 0 (GPU-sim-0): 15.0 GiB available")
    assert set(rows_of(pg_url, job)) == {"a", "b"}  # each host's own view is kept
    for _ in range(3):  # the hosts' ticks take turns: what status shows stays put
        b.tick(), a.tick()
        assert "host b: GPU 0 (GPU-sim-0): 15.0" in a.job(job).reason
    # b's GPU fills: b writes its farther view, and a's (written before, unchanged) shows.
    b.set_gpus([gpu_entry(0, 5)])
    b.tick(REASON_FIGURES_EVERY_S)
    assert a.job(job).reason.startswith("host a: GPU 0 (GPU-sim-0): 12.0 GiB available")
    # a falls silent past host_timeout_s: its view no longer counts at the next write.
    time.sleep(TIMEOUT_S + 0.3)
    b.set_gpus([gpu_entry(0, 4)])
    b.tick(REASON_FIGURES_EVERY_S)
    assert b.job(job).reason.startswith("host b: GPU 0 (GPU-sim-0): 4.0 GiB available")


def test_a_started_jobs_reasons_are_dropped(tmp_path: Path, pg_url: str) -> None:
    """A host deletes its reasons of a job it no longer has one for (started here or on
    another host): the per-host reasons do not pile up with every job ever queued."""
    a, b = host(tmp_path, pg_url, "a"), host(tmp_path, pg_url, "b")
    a.env["STUB_MODE"] = b.env["STUB_MODE"] = "sleep"
    a.set_gpus([gpu_entry(0, 10)]), b.set_gpus([gpu_entry(0, 10)])
    job = a.submit("j")
    a.tick(), b.tick()
    assert set(rows_of(pg_url, job)) == {"a", "b"}
    b.set_gpus([gpu_entry(0, 50)])
    b.tick()
    assert b.state(job) == "running"
    a.tick()
    assert rows_of(pg_url, job) == {}
    b.daemon.stop_all(b.now, hard=True)
