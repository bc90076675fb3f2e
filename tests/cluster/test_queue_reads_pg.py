"""What a host reads of a long queue at each tick on a shared ledger: the metrics count the
waiting jobs from the daemon's own list, not by reading every waiting row again."""
# ruff: noqa: E402 - the driver check runs before the imports that need the driver

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.pgserver import require_driver

require_driver()

from gpuspool.metrics import DaemonMetrics
from tests.cluster.test_daemon_pg import host
from tests.conftest import gpu_entry


def test_metrics_count_a_long_queue_without_reading_it(tmp_path: Path, pg_url: str) -> None:
    a, b = host(tmp_path, pg_url, "a"), host(tmp_path, pg_url, "b")
    a.set_gpus([gpu_entry(0, 10)]), b.set_gpus([gpu_entry(0, 10)])  # nothing fits anywhere
    for i in range(30):
        a.submit(f"j{i}")
    a.tick(), a.tick()
    reads: list[int] = []
    original = a.daemon.ledger.waiting

    def spy() -> Any:
        reads.append(1)
        return original()

    a.daemon.ledger.waiting = spy  # type: ignore[method-assign]
    metrics = DaemonMetrics()
    user = _name(a.daemon.ledger.jobs()[0].submitter_uid)
    value = metrics.registry.get_sample_value
    metrics.observe(a.daemon)
    assert reads == []  # nothing changed since the tick: no waiting row read again
    assert value("gpuspool_user_jobs", {"user": user, "state": "waiting"}) == 30
    b.submit("late")
    b.tick()  # another host changes the queue: the next count reads it once, and sees the job
    metrics.observe(a.daemon)
    assert len(reads) == 1
    assert value("gpuspool_user_jobs", {"user": user, "state": "waiting"}) == 31


def _name(uid: int) -> str:
    """The ``user`` label: the user's name, or the uid when it has none."""
    from gpuspool.privileges import user_name_of

    return user_name_of(uid) or str(uid)
