"""Heartbeats, the conditional claim, fencing, and requeueing a silent host's jobs."""
# ruff: noqa: E402 - the driver check runs before the imports that need the driver

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.pgserver import require_driver

require_driver()

from gpuspool.ledger import LedgerError
from gpuspool.ledger_pg import FencedOut, PgLedger
from gpuspool.models import JobSpec, JobState


def add(ledger: PgLedger, tmp_path: Path, job_id: str, *, priority: int = 0) -> None:
    spec = JobSpec.model_validate(
        {
            "input": str(tmp_path / "in.jsonl"),
            "output": str(tmp_path / f"{job_id}.jsonl"),
            "tokenizer": "tok",
            "priority": priority,
        }
    )
    ledger.add(job_id=job_id, spec=spec, submitter_uid=1000, need_gib=1.0, threshold_gib=1.0,
               spool_file=None, now=1.0)  # fmt: skip


def test_heartbeat_keeps_one_row_per_host(pg_url: str) -> None:
    """Each heartbeat replaces the host's row; age is measured on the database's clock."""
    a, b = PgLedger(pg_url, host_name="a"), PgLedger(pg_url, host_name="b")
    a.heartbeat(gpus=[{"uuid": "GPU-1", "free_mib": 1.0}], version="0.1.0", draining=False)
    b.heartbeat(gpus=[], version="0.1.0", draining=True)
    time.sleep(0.2)
    a.heartbeat(gpus=[{"uuid": "GPU-1", "free_mib": 2.0}], version="0.2.0", draining=False)
    hosts = {h.name: h for h in b.hosts()}
    assert set(hosts) == {"a", "b"}
    assert hosts["a"].gpus == [{"uuid": "GPU-1", "free_mib": 2.0}] and hosts["a"].version == "0.2.0"
    assert hosts["b"].draining and hosts["b"].age_s >= 0.2 > hosts["a"].age_s >= 0


def test_claim_is_conditional_and_ordered(pg_url: str, tmp_path: Path) -> None:
    """A claimed job cannot be claimed again; claim_next takes priority, then submission order,
    and skips jobs whose retry time is ahead."""
    a, b = PgLedger(pg_url, host_name="a"), PgLedger(pg_url, host_name="b")
    for job_id, prio in [("low", 0), ("high", 5), ("later", 9)]:
        add(a, tmp_path, job_id, priority=prio)
    a.transition("later", JobState.DEFERRED, now=2.0, not_before=100.0)
    first = b.claim_next(now=3.0, gpu_uuid="GPU-b")
    assert first is not None and first.job.id == "high" and first.fence == 1
    assert first.job.state == JobState.RUNNING and first.job.gpu_uuid == "GPU-b"
    with pytest.raises(LedgerError, match="high is running"):
        a.claim("high", now=3.0)
    with pytest.raises(LedgerError, match="later is deferred"):
        a.claim("later", now=3.0)
    assert a.claim("low", now=3.0).job.id == "low"
    assert b.claim_next(now=4.0) is None
    assert b.claim_next(now=100.0).job.id == "later"  # type: ignore[union-attr]


def test_silent_host_loses_its_job_and_is_fenced_out(pg_url: str, tmp_path: Path) -> None:
    """A host silent past the timeout has its job requeued; another claims it with the next
    token; the first host's writes with the old token change nothing."""
    a, b = PgLedger(pg_url, host_name="a"), PgLedger(pg_url, host_name="b")
    add(a, tmp_path, "j")
    a.heartbeat(gpus=[], version="v", draining=False)
    old = a.claim("j", now=2.0, gpu_uuid="GPU-a")
    assert a.owns("j", old.fence)
    b.heartbeat(gpus=[], version="v", draining=False)
    assert b.requeue_silent_hosts(timeout_s=60.0, now=3.0) == []  # a is not silent yet
    time.sleep(0.3)
    assert a.requeue_silent_hosts(timeout_s=0.2, now=3.0) == []  # never requeues its own
    assert b.requeue_silent_hosts(timeout_s=0.2, now=3.0) == ["j"]
    moved = b.get("j")
    assert moved is not None and moved.state == JobState.INTERRUPTED and moved.pid is None
    new = b.claim("j", now=4.0, gpu_uuid="GPU-b")
    assert new.fence == old.fence + 1
    assert not a.owns("j", old.fence) and b.owns("j", new.fence)
    with pytest.raises(FencedOut, match="now attempt 2 on b"):
        a.fenced_transition("j", JobState.DONE, fence=old.fence, now=5.0, finished_at=5.0)
    assert b.get("j").state == JobState.RUNNING  # type: ignore[union-attr]
    b.fenced_transition("j", JobState.DONE, fence=new.fence, now=6.0, finished_at=6.0)
    audit = b.audit("j")
    assert [(t["to_state"], t["host"], t["fence"]) for t in audit] == [
        ("queued", "a", None), ("running", "a", 1), ("interrupted", "b", 1),
        ("running", "b", 2), ("done", "b", 2),
    ]  # fmt: skip


def test_transitions_commit_in_seq_order(pg_url: str, tmp_path: Path) -> None:
    """Writers on four connections at once: a reader that follows ``transitions_after(last)``
    (as the metrics do) sees every transition, none skipped by a later-committing lower seq."""
    import threading

    setup = PgLedger(pg_url, host_name="setup")
    for w in range(4):
        for i in range(40):
            add(setup, tmp_path, f"w{w}-{i}")

    def write(w: int) -> None:
        ledger = PgLedger(pg_url, host_name=f"h{w}")
        for i in range(40):
            claim = ledger.claim(f"w{w}-{i}", now=2.0)
            ledger.fenced_transition(claim.job.id, JobState.DONE, fence=claim.fence, now=3.0)
        ledger.close()

    writers = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in writers:
        t.start()
    reader = PgLedger(pg_url, host_name="reader")
    seen: list[int] = []
    while True:
        finished = not any(t.is_alive() for t in writers)  # read once more after the last write
        for row in reader.transitions_after(seen[-1] if seen else 0):
            seen.append(row["seq"])
        if finished:
            break
    assert len(seen) == 160 * 3  # queued, running, done for each job
    assert seen == [t["seq"] for t in reader.transitions()]
