"""The ledger: idempotent insert, guarded transitions, cancellation, audit trail."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpuspool.ledger import Ledger, LedgerError
from gpuspool.models import JobSpec, JobState


def spec(tmp_path: Path, **kw: object) -> JobSpec:
    data = {"input": str(tmp_path / "in.jsonl"), "output": str(tmp_path / "out.jsonl"),
            "tokenizer": "tok", **kw}  # fmt: skip
    return JobSpec.model_validate(data)


def add(ledger: Ledger, tmp_path: Path, job_id: str = "j1", now: float = 1.0) -> bool:
    return ledger.add(job_id=job_id, spec=spec(tmp_path), submitter_uid=1000, need_gib=2.0,
                      threshold_gib=100.0, spool_file=None, now=now)  # fmt: skip


def test_add_is_idempotent(tmp_path: Path) -> None:
    """Adding the same job id twice keeps one job (a rescan after a crash adds nothing)."""
    ledger = Ledger(tmp_path / "l.db")
    assert add(ledger, tmp_path) is True
    assert add(ledger, tmp_path) is False
    assert [j.id for j in ledger.jobs()] == ["j1"]
    assert ledger.get("j1").state == JobState.QUEUED  # type: ignore[union-attr]


def test_guarded_transition_refuses_wrong_state(tmp_path: Path) -> None:
    """A transition that expects another state changes nothing."""
    ledger = Ledger(tmp_path / "l.db")
    add(ledger, tmp_path)
    ledger.transition("j1", JobState.RUNNING, now=2.0, expect=[JobState.QUEUED], pid=42)
    with pytest.raises(LedgerError):
        ledger.transition("j1", JobState.RUNNING, now=3.0, expect=[JobState.QUEUED])
    rec = ledger.get("j1")
    assert rec is not None and rec.pid == 42 and rec.state == JobState.RUNNING
    states = [t["to_state"] for t in ledger.transitions("j1")]
    assert states == ["queued", "running"]


def test_cancel_waiting_is_immediate_running_is_flagged(tmp_path: Path) -> None:
    """Cancelling a queued job ends it; a running one is flagged for the daemon to stop."""
    ledger = Ledger(tmp_path / "l.db")
    add(ledger, tmp_path, "a")
    add(ledger, tmp_path, "b")
    assert ledger.request_cancel("a", now=2.0).state == JobState.CANCELLED
    ledger.transition("b", JobState.RUNNING, now=2.0)
    rec = ledger.request_cancel("b", now=3.0)
    assert rec.state == JobState.RUNNING and rec.cancel_requested
    with pytest.raises(LedgerError):
        ledger.request_cancel("a", now=4.0)


def test_state_survives_reopen(tmp_path: Path) -> None:
    """What one connection committed, another sees (durable, WAL)."""
    path = tmp_path / "l.db"
    ledger = Ledger(path)
    add(ledger, tmp_path)
    ledger.update("j1", now=2.0, progress={"lines_done": 3}, reason="waiting")
    other = Ledger(path)
    rec = other.get("j1")
    assert rec is not None and rec.progress == {"lines_done": 3} and rec.reason == "waiting"
    assert other.find("j").id == "j1"
