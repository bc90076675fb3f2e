"""The ledger: idempotent insert, guarded transitions, cancellation, audit trail.

Every test runs on both backends: SQLite (a file) and PostgreSQL (a fresh database on the test
server). ``open_ledger`` opens a new connection to the same ledger each time it is called.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gpuspool.ledger import Ledger, LedgerError, OutputClaimed
from gpuspool.ledger_api import LedgerBackend
from gpuspool.models import JobSpec, JobState

OpenLedger = Callable[[], LedgerBackend]


@pytest.fixture(params=["sqlite", "postgresql"])
def open_ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenLedger]:
    """Opens a connection to one ledger per test (of the backend the parameter names)."""
    opened: list[LedgerBackend] = []

    def open_one() -> LedgerBackend:
        if request.param == "sqlite":
            ledger: LedgerBackend = Ledger(tmp_path / "l.db")
        else:
            url = request.getfixturevalue("pg_url")  # fails in CI, skips elsewhere, if no server
            from gpuspool.ledger_pg import PgLedger

            ledger = PgLedger(url, host_name="test-host")
        opened.append(ledger)
        return ledger

    yield open_one
    for ledger in opened:
        ledger.close()


def spec(tmp_path: Path, **kw: object) -> JobSpec:
    data = {"input": str(tmp_path / "in.jsonl"), "output": str(tmp_path / "out.jsonl"),
            "tokenizer": "tok", **kw}  # fmt: skip
    return JobSpec.model_validate(data)


def add(ledger: LedgerBackend, tmp_path: Path, job_id: str = "j1", now: float = 1.0) -> bool:
    """A job of its own output (two unfinished jobs never share one)."""
    job = spec(tmp_path, output=str(tmp_path / f"{job_id}.jsonl"))
    return ledger.add(job_id=job_id, spec=job, submitter_uid=1000, need_gib=2.0,
                      threshold_gib=100.0, spool_file=None, now=now)  # fmt: skip


def test_an_output_is_claimed_by_one_unfinished_job(
    open_ledger: OpenLedger, tmp_path: Path
) -> None:
    """A second job writing an unfinished job's output is refused and adds nothing; once the
    first has finished, the output may be written again."""
    ledger = open_ledger()
    out = str(tmp_path / "out.jsonl")
    assert ledger.add(job_id="a", spec=spec(tmp_path), submitter_uid=1000, need_gib=2.0,
                      threshold_gib=10.0, spool_file=None, now=1.0)  # fmt: skip
    with pytest.raises(OutputClaimed, match="already the output of job a") as caught:
        ledger.add(job_id="b", spec=spec(tmp_path), submitter_uid=1001, need_gib=2.0,
                   threshold_gib=10.0, spool_file=None, now=2.0)  # fmt: skip
    assert caught.value.other == "a" and ledger.get("b") is None
    assert [t["job_id"] for t in ledger.transitions()] == ["a"]
    assert ledger.output_claimed(out) == "a"
    ledger.transition("a", JobState.DONE, now=3.0, finished_at=3.0, exit_class="done")
    assert ledger.output_claimed(out) is None
    assert ledger.add(job_id="b", spec=spec(tmp_path), submitter_uid=1001, need_gib=2.0,
                      threshold_gib=10.0, spool_file=None, now=4.0)  # fmt: skip


def test_add_is_idempotent(open_ledger: OpenLedger, tmp_path: Path) -> None:
    """Adding the same job id twice keeps one job (a rescan after a crash adds nothing)."""
    ledger = open_ledger()
    assert add(ledger, tmp_path) is True
    assert add(ledger, tmp_path) is False
    assert [j.id for j in ledger.jobs()] == ["j1"]
    assert ledger.get("j1").state == JobState.QUEUED  # type: ignore[union-attr]


def test_guarded_transition_refuses_wrong_state(open_ledger: OpenLedger, tmp_path: Path) -> None:
    """A transition that expects another state changes nothing."""
    ledger = open_ledger()
    add(ledger, tmp_path)
    ledger.transition("j1", JobState.RUNNING, now=2.0, expect=[JobState.QUEUED], pid=42)
    with pytest.raises(LedgerError):
        ledger.transition("j1", JobState.RUNNING, now=3.0, expect=[JobState.QUEUED])
    rec = ledger.get("j1")
    assert rec is not None and rec.pid == 42 and rec.state == JobState.RUNNING
    states = [t["to_state"] for t in ledger.transitions("j1")]
    assert states == ["queued", "running"]


def test_cancel_waiting_is_immediate_running_is_flagged(
    open_ledger: OpenLedger, tmp_path: Path
) -> None:
    """Cancelling a queued job ends it; a running one is flagged for the daemon to stop."""
    ledger = open_ledger()
    add(ledger, tmp_path, "a")
    add(ledger, tmp_path, "b")
    assert ledger.request_cancel("a", now=2.0).state == JobState.CANCELLED
    ledger.transition("b", JobState.RUNNING, now=2.0)
    rec = ledger.request_cancel("b", now=3.0)
    assert rec.state == JobState.RUNNING and rec.cancel_requested
    with pytest.raises(LedgerError):
        ledger.request_cancel("a", now=4.0)


def test_state_survives_reopen(open_ledger: OpenLedger, tmp_path: Path) -> None:
    """What one connection committed, another sees (durable, WAL)."""
    ledger = open_ledger()
    add(ledger, tmp_path)
    ledger.update("j1", now=2.0, progress={"lines_done": 3}, reason="waiting")
    other = open_ledger()
    rec = other.get("j1")
    assert rec is not None and rec.progress == {"lines_done": 3} and rec.reason == "waiting"
    assert other.find("j").id == "j1"


def test_placement_reads_agree(open_ledger: OpenLedger, tmp_path: Path) -> None:
    """waiting() orders by priority then submission; status rows, counts and reasons follow."""
    ledger = open_ledger()
    for i, prio in enumerate([0, 5, 0, 5]):
        job = spec(tmp_path, priority=prio, gpus=[0, "GPU-x"], output=str(tmp_path / f"{i}.out"))
        ledger.add(job_id=f"j{i}", spec=job,
                   submitter_uid=1000, need_gib=2.0, threshold_gib=10.0 + i, spool_file=None,
                   now=1.0 + i)  # fmt: skip
    ledger.transition("j2", JobState.RUNNING, now=9.0, gpu_uuid="GPU-x", pid=7, attempts=1)
    ledger.transition("j0", JobState.DONE, now=10.0, finished_at=10.0, exit_class="done")
    waiting = ledger.waiting()
    assert [w.id for w in waiting] == ["j1", "j3"]
    assert waiting[0].gpus == (0, "GPU-x") and waiting[0].threshold_gib == 11.0
    ledger.set_reasons({"j1": "need 11", "j2": "not waiting"}, now=11.0)
    assert ledger.get("j1").reason == "need 11"  # type: ignore[union-attr]
    assert ledger.get("j2").reason is None  # type: ignore[union-attr]
    assert ledger.counts() == {"queued": 2, "running": 1, "done": 1}
    rows = ledger.status_rows(finished_limit=None, waiting_limit=1)
    assert [r["id"] for r in rows] == ["j0", "j1", "j2"]
    assert rows[2]["gpu_uuid"] == "GPU-x" and rows[0]["exit_class"] == "done"
    assert [r["id"] for r in ledger.status_rows(finished_limit=0)] == ["j1", "j2", "j3"]
    assert ledger.output_claimed(str(tmp_path / "1.out")) == "j1"
    assert ledger.output_claimed(str(tmp_path / "0.out")) is None  # j0 is done
    with pytest.raises(LedgerError, match="matches 4 jobs"):
        ledger.find("j")
    with pytest.raises(ValueError, match="unknown job fields"):
        ledger.transition("j1", JobState.RUNNING, now=12.0, state="done")


def test_audit_trail_and_versions(open_ledger: OpenLedger, tmp_path: Path) -> None:
    """Each state change leaves one transition; another connection's change moves the version."""
    ledger, other = open_ledger(), open_ledger()
    add(ledger, tmp_path)
    before = ledger.jobs_version
    other.transition("j1", JobState.RUNNING, now=2.0, detail="GPU-x")
    assert ledger.jobs_version != before
    other.transition("j1", JobState.RUNNING, now=2.5, pid=9)  # same state: no transition row
    other.transition("j1", JobState.DEFERRED, now=3.0, not_before=60.0, detail="oom")
    trail = ledger.transitions("j1")
    assert [(t["from_state"], t["to_state"], t["detail"]) for t in trail] == [
        (None, "queued", "submitted"), ("queued", "running", "GPU-x"),
        ("running", "deferred", "oom"),
    ]  # fmt: skip
    assert set(trail[0]) == {"seq", "job_id", "at", "from_state", "to_state", "detail"}
    assert ledger.last_transition_seq() == trail[-1]["seq"]
    assert [t["to_state"] for t in ledger.transitions_after(trail[0]["seq"])] == [
        "running", "deferred"
    ]  # fmt: skip
    assert len(ledger.transitions_since(2.9)) == 3 and ledger.transitions() == trail
    assert ledger.get("j1").not_before == 60.0  # type: ignore[union-attr]


def test_meta_draining_and_gpu_history(open_ledger: OpenLedger) -> None:
    """Meta keys, the drain flag and GPU history buckets (an unreadable poll is a gap)."""
    ledger = open_ledger()
    assert ledger.draining() is False and ledger.get_meta("gpus") is None
    ledger.set_draining(True)
    ledger.set_meta("gpus", '{"at": 1}')
    ledger.set_meta("gpus", '{"at": 2}')
    assert open_ledger().draining() is True and ledger.get_meta("gpus") == '{"at": 2}'
    for t, free in [(100.0, 10.0), (101.0, 30.0), (111.0, None), (121.0, 5.0)]:
        ledger.record_gpu_history(t, [("GPU-a", free, 80.0)])
    buckets = ledger.gpu_history_buckets(100.0, 10.0)
    assert [(b["bucket"], b["min_free_mib"], b["mean_free_mib"], b["polls"]) for b in buckets] == [
        (0, 10.0, 20.0, 2), (1, None, None, 1), (2, 5.0, 5.0, 1),
    ]  # fmt: skip
    ledger.prune_gpu_history(111.0)
    assert [b["polls"] for b in ledger.gpu_history_buckets(0.0, 1000.0)] == [2]


def test_yields_are_counted_and_kept(open_ledger: OpenLedger, tmp_path: Path) -> None:
    """A yield moves the job back to queued with its count and its last yield; both survive a
    reopen and show in status rows (the job keeps its place: same seq, no attempt)."""
    ledger = open_ledger()
    add(ledger, tmp_path)
    seq = ledger.get("j1").seq  # type: ignore[union-attr]
    ledger.transition("j1", JobState.RUNNING, now=2.0, gpu_uuid="GPU-0")
    last = {"pid": 42, "user": "ann", "gpu_uuid": "GPU-0", "gpu_index": 0, "at": 3.0}
    ledger.transition(
        "j1", JobState.QUEUED, now=3.0, expect=[JobState.RUNNING], detail="yielded to pid 42",
        yields=1, last_yield_json=json.dumps(last),
    )  # fmt: skip
    again = open_ledger().get("j1")
    assert again is not None and again.state == JobState.QUEUED
    assert (again.yields, again.last_yield, again.attempts, again.seq) == (1, last, 0, seq)
    (row,) = ledger.status_rows(finished_limit=10)
    assert row["yields"] == 1 and json.loads(row["last_yield_json"]) == last
    assert ledger.transitions("j1")[-1]["detail"] == "yielded to pid 42"


def test_sqlite_file_of_an_older_version_gains_the_yield_columns(tmp_path: Path) -> None:
    """A ledger file written before yields existed is brought up to date at open."""
    import sqlite3

    path = tmp_path / "old.db"
    Ledger(path).close()
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE jobs DROP COLUMN yields")
    db.execute("ALTER TABLE jobs DROP COLUMN last_yield_json")
    db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    ledger = Ledger(path)
    add(ledger, tmp_path)
    assert ledger.get("j1").yields == 0  # type: ignore[union-attr]
    assert ledger.get_meta("schema_version") == "2"
