"""Placement: stability window, reservations, one start per GPU, errors, impossible needs."""

from __future__ import annotations

from gpuspool.models import GpuSnapshot
from gpuspool.placement import Candidate, GpuView, place


def gpu(
    index: int, free_gib: float, total_gib: float = 80.0, *, healthy: bool = True
) -> GpuSnapshot:
    return GpuSnapshot(
        index=index,
        uuid=f"GPU-{index:04d}-aaaa-bbbb",
        name="sim",
        total_mib=total_gib * 1024,
        free_mib=free_gib * 1024,
        healthy=healthy,
        error=None if healthy else "GPU is lost",
    )


def view(snap: GpuSnapshot, *history: float | None, reserved: float = 0.0) -> GpuView:
    return GpuView(snap, tuple(history), reserved)


def job(job_id: str, threshold: float, *, priority: int = 0, seq: int = 0, gpus=None) -> Candidate:
    return Candidate(job_id, threshold, priority, seq, gpus)


def test_starts_only_after_stable_polls() -> None:
    """A GPU that fits for fewer than stable_polls polls does not start the job."""
    g = gpu(0, 50)
    d = place([job("a", 40)], [view(g, 10.0, 50.0, 50.0)], stable_polls=3)
    assert d.starts == ()
    assert "enough free, starts once it stays so for 3 polls" in d.reasons["a"]
    assert d.distance["a"] == 0.0
    d = place([job("a", 40)], [view(g, 50.0, 50.0, 50.0)], stable_polls=3)
    assert [(s.job_id, s.gpu_uuid) for s in d.starts] == [("a", g.uuid)]


def test_one_start_per_gpu_per_tick() -> None:
    """Two jobs that both fit the same GPU: only one starts this tick, the other says why."""
    g = gpu(0, 70)
    d = place([job("a", 10, seq=1), job("b", 10, seq=2)], [view(g, 70, 70, 70)], stable_polls=3)
    assert [s.job_id for s in d.starts] == ["a"]
    assert "another job started there this poll" in d.reasons["b"]


def test_unhealthy_gpu_is_never_chosen() -> None:
    """A GPU whose state is unknown is not free, however much memory it last showed."""
    g = gpu(0, 80, healthy=False)
    d = place([job("a", 1)], [view(g, 80, 80, None)], stable_polls=3)
    assert d.starts == ()
    assert "state unknown" in d.reasons["a"]


def test_reservation_shown_in_reason() -> None:
    """A reservation lowers what is available and the reason says so."""
    g = gpu(0, 60)
    d = place([job("a", 40)], [view(g, 30, 30, 30, reserved=30.0)], stable_polls=3)
    assert d.starts == ()
    assert "30.0 GiB available (free 60.0 − reserved 30.0), need 40.0" in d.reasons["a"]


def test_impossible_need_is_reported() -> None:
    """A threshold above every GPU's total memory says it can never fit."""
    d = place([job("a", 100)], [view(gpu(0, 79, 79.6), 79, 79, 79)], stable_polls=3)
    assert d.starts == ()
    assert "a" in d.impossible
    assert d.reasons["a"] == "no GPU here can ever have 100.0 GiB free: largest is 79.6 GiB"


def test_priority_then_fifo() -> None:
    """Higher priority first; equal priority in submission order."""
    g = gpu(0, 70)
    jobs = [job("old", 10, seq=1), job("new", 10, seq=2), job("urgent", 10, priority=5, seq=3)]
    d = place(jobs, [view(g, 70, 70, 70)], stable_polls=1)
    assert [s.job_id for s in d.starts] == ["urgent"]
    d = place(jobs[:2], [view(g, 70, 70, 70)], stable_polls=1)
    assert [s.job_id for s in d.starts] == ["old"]


def test_small_job_backfills_other_gpu() -> None:
    """A big job that cannot start does not keep a small one from another GPU."""
    d = place(
        [job("big", 70, seq=1), job("small", 5, seq=2)],
        [view(gpu(0, 20), 20, 20), view(gpu(1, 30), 30, 30)],
        stable_polls=2,
    )
    assert [(s.job_id, s.gpu_uuid) for s in d.starts] == [("small", gpu(0, 20).uuid)]


def test_best_fit_keeps_big_gpu_free() -> None:
    """Among GPUs that fit, the one with the least room is used."""
    a, b = gpu(0, 75), gpu(1, 15)
    d = place([job("x", 10)], [view(a, 75), view(b, 15)], stable_polls=1)
    assert d.starts[0].gpu_uuid == b.uuid


def test_allow_list_by_index_and_uuid() -> None:
    """Jobs only go to GPUs they allow, named by index or UUID; unknown ones are impossible."""
    a, b = gpu(0, 75), gpu(1, 75)
    d = place([job("x", 10, gpus=(1,))], [view(a, 75), view(b, 75)], stable_polls=1)
    assert d.starts[0].gpu_uuid == b.uuid
    d = place([job("x", 10, gpus=(a.uuid,))], [view(a, 75), view(b, 75)], stable_polls=1)
    assert d.starts[0].gpu_uuid == a.uuid
    d = place([job("x", 10, gpus=("GPU-nope",))], [view(a, 75)], stable_polls=1)
    assert d.starts == () and "x" in d.impossible
