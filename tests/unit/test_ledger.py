"""The ledger: idempotent insert, guarded transitions, cancellation, audit trail.

Every test runs on both backends: SQLite (a file) and PostgreSQL (a fresh database on the test
server). ``open_ledger`` opens a new connection to the same ledger each time it is called.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gpuspool.ledger import Ledger, LedgerError
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
            from gpuspool.ledger_pg import PgLedger

            ledger = PgLedger(request.getfixturevalue("pg_url"), host_name="test-host")
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
    return ledger.add(job_id=job_id, spec=spec(tmp_path), submitter_uid=1000, need_gib=2.0,
                      threshold_gib=100.0, spool_file=None, now=now)  # fmt: skip


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
