"""Waiting reasons on a shared ledger: a whole queue's reasons in one statement, rows that
already say it untouched, and never a wait on a row another host holds."""
# ruff: noqa: E402 - the driver check runs before the imports that need the driver

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.pgserver import require_driver

require_driver()

import psycopg
import pytest

from gpuspool.ledger_pg import PgLedger
from gpuspool.models import JobSpec, JobState

JOBS = 400


@pytest.fixture
def queue(pg_url: str, tmp_path: Path) -> Iterator[PgLedger]:
    """``JOBS`` queued jobs, and one more running."""
    ledger = PgLedger(pg_url, host_name="a")
    for i in range(JOBS + 1):
        spec = JobSpec.model_validate(
            {"input": str(tmp_path / "in.jsonl"), "output": str(tmp_path / f"o{i}.jsonl"),
             "tokenizer": "t"}
        )  # fmt: skip
        ledger.add(job_id=f"j{i:04d}", spec=spec, submitter_uid=1000, need_gib=1.0,
                   threshold_gib=20.0, spool_file=None, now=1.0)  # fmt: skip
    ledger.claim(f"j{JOBS:04d}", now=2.0, reason="running on GPU-0")
    yield ledger
    ledger.close()


def statements_of(call: Any) -> int:
    """How many statements ``call()`` sends (each row of an ``executemany`` counts)."""
    count = [0]
    execute, executemany = psycopg.Cursor.execute, psycopg.Cursor.executemany

    def one(self: Any, *args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return execute(self, *args, **kwargs)

    def many(self: Any, query: Any, params: Any, **kwargs: Any) -> Any:
        rows = list(params)
        count[0] += len(rows)
        return executemany(self, query, rows, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(psycopg.Cursor, "execute", one)
        mp.setattr(psycopg.Cursor, "executemany", many)
        call()
    return count[0]


def test_a_whole_queues_reasons_are_one_statement(queue: PgLedger) -> None:
    reasons = {f"j{i:04d}": f"GPU 0: {i % 7}.0 GiB available, need 20.0" for i in range(JOBS + 1)}
    assert statements_of(lambda: queue.set_reasons(reasons, now=5.0)) == 1
    jobs = {j.id: j for j in queue.jobs()}
    assert all(jobs[j].reason == reasons[j] for j in reasons if j != f"j{JOBS:04d}")
    running = jobs[f"j{JOBS:04d}"]
    assert running.state == JobState.RUNNING and running.reason == "running on GPU-0"
    assert all(j.updated_at == 5.0 for j in jobs.values() if j.state == JobState.QUEUED)
    # The same reasons again, and one changed: only that row is written.
    changed = {**reasons, "j0003": "held back"}
    queue.set_reasons(changed, now=6.0)
    touched = {j.id for j in queue.jobs() if j.updated_at == 6.0}
    assert touched == {"j0003"}


def test_a_row_another_host_holds_is_skipped_not_waited_for(queue: PgLedger, pg_url: str) -> None:
    """Host b holds j0001's row (its claim or its own reasons, not yet committed): a's reasons
    go in at once for every other job, and j0001 keeps what b writes."""
    with psycopg.connect(pg_url) as other:
        other.execute("SELECT 1 FROM jobs WHERE id = 'j0001' FOR UPDATE")
        began = time.monotonic()
        queue.set_reasons({f"j{i:04d}": "GPU 0 on a: busy" for i in range(JOBS)}, now=7.0)
        assert time.monotonic() - began < 2.0
        other.execute("UPDATE jobs SET reason = 'GPU 0 on b: busy' WHERE id = 'j0001'")
        other.commit()
    jobs = {j.id: j.reason for j in queue.jobs()}
    assert jobs["j0001"] == "GPU 0 on b: busy"
    assert {jobs[f"j{i:04d}"] for i in range(JOBS) if i != 1} == {"GPU 0 on a: busy"}
