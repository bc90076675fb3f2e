"""The crash-kill suite's named points on a PostgreSQL ledger: the daemon SIGKILLs itself once at
each; afterwards every job is done, once, as on SQLite."""
# ruff: noqa: E402 - the driver check runs before the imports that need the driver

from __future__ import annotations

from pathlib import Path

from tests.pgserver import require_driver

require_driver()

from tests.reliability.crashkill import CrashKill
from tests.reliability.killpoint_daemon import KILL_POINTS
from tests.reliability.test_crash_kill import SEED, _assert_clean


def test_every_kill_point_is_survived_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    plan: list[tuple[str, str | None]] = [("kill_point", p) for p in sorted(KILL_POINTS)]
    run = CrashKill(tmp_path, seed=SEED, cycles=len(plan), plan=plan, ledger_url=pg_url)
    r = run.run()
    _assert_clean(r.summary(), r.lost_jobs, r.duplicated_runs, r.corrupted_outputs, r.problems)
    assert r.not_done == 0
    assert sum(r.kill_points.values()) >= len(KILL_POINTS) - 2, r.summary()
