"""Generated job files through the real intake: never a crash, each decided once, with a reason."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.reliability.jobfuzz import run_fuzz

SEED = int(os.environ.get("GPUSPOOL_FUZZ_SEED", "5"))


def _root(tmp_path: Path) -> Path:
    """The fuzz folder: in RAM where there is some (every rejection fsyncs a reason file)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        import tempfile

        return Path(tempfile.mkdtemp(prefix="gpuspool-fuzz-", dir=shm))
    return tmp_path


def test_fuzzed_job_files_short(tmp_path: Path) -> None:
    """CI version: 1,500 generated files; valid ones accepted, the rest rejected with reasons."""
    report = run_fuzz(_root(tmp_path), int(os.environ.get("GPUSPOOL_FUZZ_EXAMPLES", "1500")), SEED)
    print(report.summary())
    assert report.failures == [], "\n".join(report.failures[:20])
    assert report.valid_fed > 50 and report.rejected > 500


@pytest.mark.slow
def test_fuzzed_job_files_10000(tmp_path: Path) -> None:
    """On demand: 10,000 generated files."""
    report = run_fuzz(_root(tmp_path), 10_000, SEED)
    print(report.summary())
    assert report.failures == [], "\n".join(report.failures[:20])
    assert report.files >= 10_000
