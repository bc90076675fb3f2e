"""SIGKILL the real daemon and its workers across the lifecycle; nothing is lost or run twice."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import Harness
from tests.reliability.crashkill import CrashKill
from tests.reliability.killpoint_daemon import KILL_POINTS

SEED = int(os.environ.get("GPUSPOOL_CRASHKILL_SEED", "20260501"))


def _assert_clean(report_text: str, lost: int, dup: int, corrupt: int, problems: list[str]) -> None:
    assert (lost, dup, corrupt, problems) == (0, 0, 0, []), report_text


def test_crash_between_ledger_add_and_accept_keeps_the_file(harness: Harness) -> None:
    """A crash after the ledger took a job but before its file moved: the file ends in accepted/."""

    class Crash(BaseException):
        pass

    def crash(raw: object) -> None:
        raise Crash

    job = harness.submit("a")
    harness.daemon.spool.accept = crash  # type: ignore[method-assign]
    with pytest.raises(Crash):
        harness.tick()
    assert harness.daemon.ledger.get(job) is not None
    harness.daemon = harness.new_daemon()
    report = harness.tick()
    assert report.rejected == [] and harness.daemon.spool.pending() == []
    assert (harness.settings.accepted_dir / f"{job}.json").exists()
    assert harness.state(job) == "queued"


def test_every_kill_point_is_survived(tmp_path: Path) -> None:
    """The daemon SIGKILLs itself once at each named point; afterwards every job is done, once."""
    plan: list[tuple[str, str | None]] = [("kill_point", p) for p in sorted(KILL_POINTS)]
    run = CrashKill(tmp_path, seed=SEED, cycles=len(plan), plan=plan)
    r = run.run()
    _assert_clean(r.summary(), r.lost_jobs, r.duplicated_runs, r.corrupted_outputs, r.problems)
    assert r.not_done == 0
    assert sum(r.kill_points.values()) >= len(KILL_POINTS) - 2, r.summary()


def test_crash_kill_short(
    tmp_path: Path, tokenizer_dir: Path, audio_input: Path, reference_output: bytes
) -> None:
    """CI version: 12 seeded cycles of daemon/worker SIGKILLs, two jobs with the real worker."""
    run = CrashKill(
        tmp_path,
        seed=SEED,
        cycles=12,
        tokenizer=tokenizer_dir,
        real_input=audio_input,
        real_reference=reference_output,
        real_cycles=frozenset({0, 5}),
    )
    r = run.run()
    print(r.summary())
    _assert_clean(r.summary(), r.lost_jobs, r.duplicated_runs, r.corrupted_outputs, r.problems)
    assert r.not_done == 0 and r.real_jobs == 2 and r.kills >= 12


@pytest.mark.slow
def test_crash_kill_long(
    tmp_path: Path, tokenizer_dir: Path, audio_input: Path, reference_output: bytes
) -> None:
    """On demand: 100 cycles, about one in eight with a real-worker job."""
    cycles = int(os.environ.get("GPUSPOOL_CRASHKILL_CYCLES", "100"))
    run = CrashKill(
        tmp_path,
        seed=SEED,
        cycles=cycles,
        real_fraction=0.125,
        tokenizer=tokenizer_dir,
        real_input=audio_input,
        real_reference=reference_output,
        real_cycles=frozenset({0}),
    )
    r = run.run()
    print(r.summary())
    _assert_clean(r.summary(), r.lost_jobs, r.duplicated_runs, r.corrupted_outputs, r.problems)
    assert r.not_done == 0
