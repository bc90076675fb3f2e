"""What an idle tick reads on a shared ledger: the running jobs, the draining flag and the
state counts once each, for the tick and what reads the ledger after it (the status line, the
metrics), not once per use. Idle: the running worker's own start and progress events, which the
tick records (a write, after which it reads again), are in before the tick is measured."""
# ruff: noqa: E402 - the driver check runs before the imports that need the driver

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from tests.pgserver import require_driver

require_driver()

import psycopg
import pytest

from gpuspool.metrics import DaemonMetrics
from gpuspool.service import status_line
from tests.cluster.test_daemon_pg import host
from tests.conftest import gpu_entry, wait_until


def statements(call: Any) -> Counter[str]:
    """The statements ``call()`` sends, by their text."""
    sent: Counter[str] = Counter()
    execute = psycopg.Cursor.execute

    def spy(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        sent[str(query)] += 1
        return execute(self, query, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(psycopg.Cursor, "execute", spy)
        call()
    return sent


def test_an_idle_tick_reads_each_thing_once(tmp_path: Path, pg_url: str) -> None:
    a = host(tmp_path, pg_url, "a")
    a.env["STUB_MODE"] = "sleep"
    a.set_gpus([gpu_entry(0, 50)])
    a.submit("j")
    a.tick(), a.tick()

    def reported() -> bool:  # the worker's first events recorded: later ticks write nothing
        a.tick()
        return any(j.progress.get("lines_done") for j in a.daemon.running_jobs())

    wait_until(reported, timeout=60)
    metrics = DaemonMetrics()

    def tick() -> None:
        a.tick()
        metrics.observe(a.daemon)
        status_line(a.daemon)

    tick()
    sent = statements(tick)
    running = sum(n for q, n in sent.items() if q.startswith("SELECT * FROM jobs WHERE state"))
    meta = sum(n for q, n in sent.items() if q.startswith("SELECT value FROM meta"))
    counts = sum(n for q, n in sent.items() if "COUNT(*)" in q and "GROUP BY state" in q)
    assert (running, meta, counts) == (1, 1, 1), sent
    a.daemon.stop_all(a.now, hard=True)


def test_a_write_in_the_tick_is_seen_by_what_follows(tmp_path: Path, pg_url: str) -> None:
    """The reads are taken again after the daemon's own writes: a job it starts is in the
    status line and the metrics of that same tick."""
    a = host(tmp_path, pg_url, "a")
    a.env["STUB_MODE"] = "sleep"
    a.set_gpus([gpu_entry(0, 50)])
    a.submit("j")
    a.tick()
    assert "1 running" in status_line(a.daemon)
    assert [j.name for j in a.daemon.running_jobs()] == ["j"]
    a.daemon.stop_all(a.now, hard=True)
