"""GpuObserver: history of available memory per GPU, reservations, errors logged once."""

from __future__ import annotations

from dataclasses import dataclass

from structlog.testing import capture_logs

from gpuspool.gpus import ProbeResult
from gpuspool.models import GpuProcess, GpuSnapshot
from gpuspool.observe import HISTORY_EVERY_S, GpuObserver, reservations

GIB = 1024.0


@dataclass(frozen=True)
class Job:
    gpu_uuid: str | None
    pid: int | None
    need_gib: float


def gpu(uuid: str, free_gib: float, *, error: str | None = None, procs: tuple[GpuProcess, ...] = ()
        ) -> GpuSnapshot:  # fmt: skip
    return GpuSnapshot(index=0, uuid=uuid, name="sim", total_mib=80 * GIB, free_mib=free_gib * GIB,
                       healthy=error is None, error=error, processes=procs)  # fmt: skip


def test_reservation_is_need_less_what_the_process_shows() -> None:
    """A job's reservation fades as NVML shows its process's memory; never below zero."""
    g = gpu("A", 40, procs=(GpuProcess(pid=7, used_mib=6 * GIB),))
    running = [Job("A", 7, 10.0), Job("A", 8, 5.0), Job(None, 9, 50.0), Job("B", 10, 3.0)]
    assert reservations(running, [g]) == {"A": 4.0 + 5.0, "B": 3.0}
    assert reservations([Job("A", 7, 2.0)], [g]) == {"A": 0.0}


def test_history_keeps_the_last_stable_polls_of_free_less_reserved() -> None:
    obs = GpuObserver(stable_polls=3)
    for free in (10, 20, 30, 40):
        obs.observe(ProbeResult((gpu("A", free),)), [Job("A", None, 5.0)])
    (view,) = obs.views()
    assert view.available_history == (15.0, 25.0, 35.0)
    assert view.reserved_gib == 5.0
    obs.stable_polls = 2  # a reload shortens the window at the next poll
    obs.observe(ProbeResult((gpu("A", 50),)), [])
    assert obs.views()[0].available_history == (35.0, 50.0)


def test_unhealthy_gpu_is_unknown_and_a_vanished_gpu_forgets_its_history() -> None:
    obs = GpuObserver(stable_polls=3)
    obs.observe(ProbeResult((gpu("A", 30), gpu("B", 30))), [])
    obs.observe(ProbeResult((gpu("A", 30, error="GPU is lost"), gpu("B", 30))), [])
    assert [v.available_history for v in obs.views()] == [(30.0, None), (30.0, 30.0)]
    obs.observe(ProbeResult((gpu("A", 30),)), [])
    obs.observe(ProbeResult((gpu("A", 30), gpu("B", 30))), [])
    # B was gone from one poll: it starts again from nothing
    assert [v.available_history for v in obs.views()] == [(None, 30.0, 30.0), (30.0,)]


def test_errors_are_logged_once_when_they_start_and_once_when_they_end() -> None:
    obs = GpuObserver(stable_polls=2)
    with capture_logs() as logs:
        for _ in range(3):
            obs.observe(ProbeResult((), "NVML init failed: Driver Not Loaded"), [])
        for _ in range(2):
            obs.observe(ProbeResult((gpu("A", 30, error="GPU is lost"),)), [])
        obs.observe(ProbeResult((gpu("A", 30),)), [])
    events = [e["event"] for e in logs]
    assert events == ["gpu_probe_error", "gpu_probe_recovered", "gpu_error", "gpu_recovered"]
    assert obs.probe_error is None


def test_history_rows_are_due_every_interval_and_record_unknown_as_a_gap() -> None:
    obs = GpuObserver(stable_polls=1)
    assert obs.history_rows(0.0) is None  # nothing seen yet
    obs.observe(ProbeResult((gpu("A", 30), gpu("B", 1, error="lost"))), [])
    assert obs.history_rows(100.0) == [("A", 30 * GIB, 80 * GIB), ("B", None, 80 * GIB)]
    assert obs.history_rows(100.0 + HISTORY_EVERY_S / 2) is None
    assert obs.history_rows(100.0 + HISTORY_EVERY_S) is not None
    assert obs.prune_before(100.0) is not None
    assert obs.prune_before(101.0) is None


def test_describe_lists_each_gpu_for_the_views() -> None:
    obs = GpuObserver(stable_polls=2)
    procs = (GpuProcess(pid=5, used_mib=512.0),)
    obs.observe(ProbeResult((gpu("A", 30, procs=procs),)), [Job("A", 6, 2.5)])
    (d,) = obs.describe()
    assert d["uuid"] == "A" and d["reserved_gib"] == 2.5 and d["history"] == [27.5]
    assert d["processes"] == [{"pid": 5, "used_mib": 512.0}]
