"""Generated job files through the real intake: never a crash, each decided once, with a reason."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.reliability.jobfuzz import run_fuzz

SEED = int(os.environ.get("GPUSPOOL_FUZZ_SEED", "5"))


def test_fuzzed_job_files_short(ram_dir: Path) -> None:
    """CI version: 1,500 generated files; valid ones accepted, the rest rejected with reasons."""
    report = run_fuzz(ram_dir, int(os.environ.get("GPUSPOOL_FUZZ_EXAMPLES", "1500")), SEED)
    print(report.summary())
    assert report.failures == [], "\n".join(report.failures[:20])
    assert report.valid_fed > 50 and report.rejected > 500


@pytest.mark.slow
def test_fuzzed_job_files_10000(ram_dir: Path) -> None:
    """On demand: 10,000 generated files."""
    report = run_fuzz(ram_dir, 10_000, SEED)
    print(report.summary())
    assert report.failures == [], "\n".join(report.failures[:20])
    assert report.files >= 10_000
