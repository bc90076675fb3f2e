"""Load: the real daemon under a deep queue and churning GPUs loses no job and no transition."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.load import LoadRun


def _check(run: LoadRun) -> None:
    r = run.run()
    print(r.summary())
    assert (r.lost_jobs, r.lost_transitions, r.left_running, r.missing_outputs) == (0, 0, 0, 0), (
        r.summary()
    )
    assert r.problems == [], r.summary()
    assert r.done > 0
    first, last = r.rss_window(True), r.rss_window(False)
    assert last - first <= max(10.0, 0.1 * first), r.summary()


def test_load_short(ram_dir: Path) -> None:
    """CI version: 1,000 queued jobs, 8 churning GPUs, 30 s."""
    _check(LoadRun(ram_dir, jobs=1000, duration_s=30))


@pytest.mark.slow
def test_load_10000_jobs(ram_dir: Path) -> None:
    """On demand: 10,000 queued jobs, 8 churning GPUs, 4 minutes."""
    _check(LoadRun(ram_dir, jobs=10_000, duration_s=240))
