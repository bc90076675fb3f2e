"""The ledger's part of fair share, on both backends: each submitter's runs, the submitter
of each waiting job, and the intake note of a lowered priority."""

from __future__ import annotations

from pathlib import Path

from gpuspool.fairshare import Run
from gpuspool.ledger_api import LedgerBackend
from gpuspool.models import JobSpec, JobState
from tests.unit import test_ledger
from tests.unit.test_ledger import OpenLedger

#: The two-backend fixture of the ledger tests (SQLite, then PostgreSQL).
open_ledger = test_ledger.open_ledger

ALICE, BOB = 1001, 1002


def add(ledger: LedgerBackend, tmp_path: Path, job_id: str, uid: int, **kw: object) -> None:
    spec = JobSpec.model_validate(
        {"input": str(tmp_path / "in.jsonl"), "output": str(tmp_path / f"{job_id}.jsonl"),
         "tokenizer": "tok"}
    )  # fmt: skip
    assert ledger.add(job_id=job_id, spec=spec, submitter_uid=uid, need_gib=2.0,
                      threshold_gib=10.0, spool_file=None, now=1.0, **kw)  # fmt: skip


def test_usage_runs_lists_every_run_and_the_running_ones(
    open_ledger: OpenLedger, tmp_path: Path
) -> None:
    """A retried job's two runs both count; a running job counts from its start; runs that
    ended before ``since`` are left out."""
    ledger = open_ledger()
    add(ledger, tmp_path, "a", ALICE)
    add(ledger, tmp_path, "b", BOB)
    add(ledger, tmp_path, "old", BOB)
    ledger.transition("old", JobState.RUNNING, now=2.0, started_at=2.0)
    ledger.transition("old", JobState.DONE, now=5.0, finished_at=5.0)
    ledger.transition("a", JobState.RUNNING, now=10.0, started_at=10.0)
    ledger.transition("a", JobState.DEFERRED, now=40.0)
    ledger.transition("a", JobState.RUNNING, now=50.0, started_at=50.0)
    ledger.transition("a", JobState.DONE, now=70.0, finished_at=70.0)
    ledger.transition("b", JobState.RUNNING, now=60.0, started_at=60.0)
    runs = sorted(open_ledger().usage_runs(since=20.0), key=lambda r: (r.uid, r.start))
    assert runs == [
        Run("a", ALICE, 10.0, 40.0),
        Run("a", ALICE, 50.0, 70.0),
        Run("b", BOB, 60.0, None),
    ]
    assert Run("old", BOB, 2.0, 5.0) in ledger.usage_runs(since=0.0)


def test_waiting_rows_carry_the_submitter(open_ledger: OpenLedger, tmp_path: Path) -> None:
    ledger = open_ledger()
    add(ledger, tmp_path, "a", ALICE)
    add(ledger, tmp_path, "b", BOB)
    assert {w.id: w.submitter_uid for w in ledger.waiting()} == {"a": ALICE, "b": BOB}


def test_add_note_lands_in_the_submitted_transition(
    open_ledger: OpenLedger, tmp_path: Path
) -> None:
    ledger = open_ledger()
    add(ledger, tmp_path, "a", ALICE, note="priority 5 lowered to 0: uid 1001 is not allowed")
    add(ledger, tmp_path, "b", BOB)
    assert ledger.transitions("a")[0]["detail"] == (
        "submitted; priority 5 lowered to 0: uid 1001 is not allowed"
    )
    assert ledger.transitions("b")[0]["detail"] == "submitted"
