"""The job key ``restart``: an earlier job's partial output is discarded at the first start only."""

from __future__ import annotations

import dataclasses

from tests.conftest import Harness


def test_restart_discards_a_partial_output_at_the_first_start_only(harness: Harness) -> None:
    ids = harness.submit("plain"), harness.submit("fresh", restart=True)
    harness.tick()  # taken in (no GPU: they wait)
    plain, fresh = (harness.job(i) for i in ids)
    assert "--no-resume" not in harness.daemon.worker_argv(plain)
    assert "--no-resume" in harness.daemon.worker_argv(fresh)
    started = dataclasses.replace(fresh, started_at=harness.now)  # retried or interrupted
    assert "--no-resume" not in harness.daemon.worker_argv(started)
