"""What a host reads and writes of a long queue at each tick on a shared ledger: the metrics
count the waiting jobs from the daemon's own list, not by reading every waiting row again; and
GPU memory moving does not rewrite every waiting job's reason at every poll."""
# ruff: noqa: E402 - the driver check runs before the imports that need the driver

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.pgserver import require_driver

require_driver()

from gpuspool.daemon import REASON_FIGURES_EVERY_S
from gpuspool.metrics import DaemonMetrics
from tests.cluster.test_daemon_pg import TIMEOUT_S, host
from tests.conftest import Harness, gpu_entry


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


def test_reasons_whose_figures_alone_move_are_written_at_most_every_30_s(
    tmp_path: Path, pg_url: str
) -> None:
    """A GPU whose free memory moves at each poll changes only the figures of the waiting
    jobs' reasons: written at most every ``REASON_FIGURES_EVERY_S``. A change of what the
    reason says (the GPU now has enough, waiting for stability) is written at once."""
    (tmp_path / "a").mkdir()
    a = Harness(tmp_path / "a", ledger_url=pg_url, host_name="a", poll_interval_s=0.1,
                stable_polls=3, host_timeout_s=TIMEOUT_S)  # fmt: skip
    a.set_gpus([gpu_entry(0, 10)])
    jobs = [a.submit(f"j{i}") for i in range(5)]
    a.tick()
    assert all("10.0 GiB available" in a.job(j).reason for j in jobs)
    written: list[set[str]] = []
    original = a.daemon.ledger.set_reasons

    def spy(reasons: dict[str, str], *, now: float, **kw: Any) -> None:
        if reasons:
            written.append(set(reasons))
        original(reasons, now=now, **kw)

    a.daemon.ledger.set_reasons = spy  # type: ignore[method-assign]
    for free in (12, 4, 15, 11):  # figures only: the first is written, then none for a while
        a.set_gpus([gpu_entry(0, free)])
        a.tick(1.0)
    assert written == [set(jobs)] and "12.0 GiB available" in a.job(jobs[0]).reason
    a.set_gpus([gpu_entry(0, 13)])
    a.tick(REASON_FIGURES_EVERY_S)  # the interval has passed: the figures are brought up to date
    assert written == [set(jobs), set(jobs)]
    assert all("13.0 GiB available" in a.job(j).reason for j in jobs)
    a.set_gpus([gpu_entry(0, 79)])
    a.tick(1.0)  # a new kind of reason: written at once
    assert len(written) == 3
    assert "enough free, starts once it stays so for 3 polls" in a.job(jobs[0]).reason


def test_the_stability_count_down_does_not_rewrite_the_queue(tmp_path: Path, pg_url: str) -> None:
    """While a GPU frees, its polls towards ``stable_polls`` change no waiting job's reason:
    the queue is written once when the GPU has enough, then not until a job starts."""
    (tmp_path / "a").mkdir()
    a = Harness(tmp_path / "a", ledger_url=pg_url, host_name="a", poll_interval_s=0.1,
                stable_polls=3, host_timeout_s=TIMEOUT_S)  # fmt: skip
    a.env["STUB_MODE"] = "sleep"
    a.set_gpus([gpu_entry(0, 10)])
    jobs = [a.submit(f"j{i}") for i in range(5)]
    a.tick()
    written: list[set[str]] = []
    dropped: list[set[str]] = []
    original = a.daemon.ledger.set_reasons

    def spy(reasons: dict[str, str], *, now: float, **kw: Any) -> None:
        written.append(set(reasons))
        dropped.append(set(kw.get("gone", ())))
        original(reasons, now=now, **kw)

    a.daemon.ledger.set_reasons = spy  # type: ignore[method-assign]
    a.set_gpus([gpu_entry(0, 79)])
    a.tick(1.0)  # enough free: every waiting reason says so, once
    a.tick(1.0)  # the count-down: nothing to write
    assert written == [set(jobs)]
    a.tick(1.0)  # third stable poll: the first job starts, and leaves the queue's reasons
    assert a.state(jobs[0]) == "running"
    assert written[1] == set(jobs[1:]) and dropped == [set(), {jobs[0]}]
    a.daemon.stop_all(a.now, hard=True)
