"""Polite scavenging in the tick, with fake time and scripted job processes (FakeRunner): a job
yields its GPU to another user's process, waits again, skips that GPU for its cool-down."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from gpuspool.logs import iso_timestamp
from tests.conftest import Harness, fake_runner, gpu_entry

FOREIGN = 777
COOLDOWN = 30.0


def harness(tmp_path: Path, **overrides: Any) -> Harness:
    settings: dict[str, Any] = {"yield_on_foreign_process": True, "yield_cooldown_s": COOLDOWN}
    return Harness(tmp_path, make_runner=fake_runner, **{**settings, **overrides})


def running_job(h: Harness, **fields: Any) -> tuple[str, int]:
    """Job "a" running (the stub "sleep" worker) on GPU 0; its pid."""
    job = h.start("sleep", **fields)
    assert h.state(job) == "running"
    pid = h.job(job).pid
    assert pid is not None
    h.fake.users[FOREIGN] = "ann"
    return job, pid


def gpu0(pid: int, *others: int, free: float = 50.0) -> dict[str, Any]:
    procs = [{"pid": pid, "used_mib": 2048}] + [{"pid": p, "used_mib": 4096} for p in others]
    return gpu_entry(0, free, processes=procs)


def test_a_foreign_process_makes_the_job_yield_after_stable_polls(tmp_path: Path) -> None:
    """stable_polls polls with another user's process on its GPU: SIGTERM, then the job is
    queued again (no attempt counted), its yield counted and described, and logged."""
    h = harness(tmp_path)
    job, pid = running_job(h)
    seq = h.job(job).seq
    h.set_gpus([gpu0(pid, FOREIGN)])
    h.tick()
    h.tick()
    assert h.fake.process(pid).signals == []  # 2 of 3 polls: not yet
    with capture_logs() as logs:
        h.tick()
        assert h.fake.process(pid).signals == [signal.SIGTERM]
        h.tick()
    rec = h.job(job)
    assert rec.state.value == "queued" and rec.attempts == 0 and rec.seq == seq
    assert rec.yields == 1 and rec.exit_class == "yielded"
    assert rec.last_yield["pid"] == FOREIGN and rec.last_yield["user"] == "ann"
    assert rec.last_yield["gpu_uuid"] == "GPU-sim-0" and rec.last_yield["gpu_index"] == 0
    detail = h.daemon.ledger.transitions(job)[-1]["detail"]
    assert detail.startswith(f"yielded to pid {FOREIGN} (user ann) on GPU 0 (GPU-sim-0)")
    (event,) = [e for e in logs if e["event"] == "job_yielded"]
    assert (event["pid"], event["user"], event["yields"]) == (FOREIGN, "ann", 1)
    stopping = [e for e in logs if e["event"] == "job_stopping"]
    assert "pid 777 (user ann)" in stopping[0]["reason"]


def test_a_process_that_goes_away_within_stable_polls_changes_nothing(tmp_path: Path) -> None:
    h = harness(tmp_path)
    job, pid = running_job(h)
    for _ in range(3):
        h.set_gpus([gpu0(pid, FOREIGN)])
        h.tick()
        h.tick()
        h.set_gpus([gpu0(pid)])
        h.tick()
    assert h.state(job) == "running" and h.fake.process(pid).signals == []


def test_our_own_processes_and_their_children_never_count(tmp_path: Path) -> None:
    """The worker, a loader it forked, and another job of ours on the same GPU are ours."""
    h = harness(tmp_path)
    job, pid = running_job(h)
    h.fake.process(pid).children.add(pid + 500)
    h.set_gpus([gpu0(pid, pid + 500)])
    for _ in range(6):
        h.tick()
    assert h.state(job) == "running" and h.fake.process(pid).signals == []
    assert h.job(job).yields == 0


def test_a_pid_the_daemon_cannot_see_is_not_a_stranger(tmp_path: Path) -> None:
    """In a container without the host's pid namespace NVML lists host pids (the job's own
    worker among them): a listed pid that is no process here never makes a job yield, and the
    daemon says once why yielding to processes cannot work there."""
    h = harness(tmp_path)
    job, pid = running_job(h)
    unseen = 4_000_001  # no such process here (FakeRunner.user_of answers None)
    h.set_gpus([gpu0(pid, unseen)])
    with capture_logs() as logs:
        for _ in range(6):
            h.tick()
    assert h.state(job) == "running" and h.fake.process(pid).signals == []
    noted = [e for e in logs if e["event"] == "gpu_pids_not_visible"]
    assert len(noted) == 1 and noted[0]["pids"] == [unseen]
    h.set_gpus([gpu0(pid, unseen, FOREIGN)])  # a stranger it can see still counts
    for _ in range(3):
        h.tick()
    assert h.fake.process(pid).signals == [signal.SIGTERM]


def test_a_process_already_there_at_the_start_is_not_a_newcomer(tmp_path: Path) -> None:
    """A job started beside another user's process does not yield to it (only to one that
    appears later): it never starts only to yield at once."""
    h = harness(tmp_path)
    h.env["STUB_MODE"] = "sleep"
    h.fake.users[FOREIGN] = "ann"  # a process the daemon sees (one it cannot is nobody's)
    h.set_gpus([gpu_entry(0, 50, processes=[{"pid": FOREIGN, "used_mib": 4096}])])
    job = h.submit("a")
    for _ in range(8):
        h.tick()
    pid = h.job(job).pid
    assert h.state(job) == "running"
    h.set_gpus([gpu0(pid, FOREIGN)])
    for _ in range(5):
        h.tick()
    assert h.state(job) == "running"
    h.fake.users[FOREIGN + 1] = "bob"
    h.set_gpus([gpu0(pid, FOREIGN, FOREIGN + 1)])
    for _ in range(4):
        h.tick()
    assert h.job(job).yields == 1 and h.job(job).last_yield["pid"] == FOREIGN + 1


def test_a_process_already_there_that_grows_is_its_owner_coming_back(tmp_path: Path) -> None:
    """An idle process beside which the job started (a notebook kernel holding a small CUDA
    context, say) that then allocates far more is its owner's run starting: the job yields to
    it, as to a newcomer. Its memory moving by less than ``TOLERATED_GROWTH_GIB`` does not."""
    h = harness(tmp_path)
    h.env["STUB_MODE"] = "sleep"
    h.fake.users[FOREIGN] = "ann"
    h.set_gpus([gpu_entry(0, 50, processes=[{"pid": FOREIGN, "used_mib": 4096}])])
    job = h.submit("a")
    for _ in range(8):
        h.tick()
    pid = h.job(job).pid
    assert pid is not None and h.state(job) == "running"
    ours = {"pid": pid, "used_mib": 2048}
    small = {"pid": FOREIGN, "used_mib": 4096 + 512}
    h.set_gpus([gpu_entry(0, 49.5, processes=[ours, small])])
    for _ in range(5):
        h.tick()
    assert h.state(job) == "running"
    grown = {"pid": FOREIGN, "used_mib": 60 * 1024}
    h.set_gpus([gpu_entry(0, 0.5, processes=[ours, grown])])
    for _ in range(4):
        h.tick()
    assert h.job(job).yields == 1 and h.job(job).last_yield["pid"] == FOREIGN


def test_yield_false_keeps_running(tmp_path: Path) -> None:
    h = harness(tmp_path)
    job, pid = running_job(h, **{"yield": False})
    h.set_gpus([gpu0(pid, FOREIGN)])
    for _ in range(8):
        h.tick()
    assert h.state(job) == "running" and h.fake.process(pid).signals == []


def test_off_by_default(tmp_path: Path) -> None:
    h = Harness(tmp_path, make_runner=fake_runner)
    job = h.start("sleep")
    pid = h.job(job).pid
    h.set_gpus([gpu0(pid, FOREIGN)])
    for _ in range(8):
        h.tick()
    assert h.state(job) == "running"


def yield_once(h: Harness, job: str, pid: int) -> None:
    yields = h.job(job).yields
    h.set_gpus([gpu0(pid, FOREIGN)])
    for _ in range(4):
        h.tick()
    assert h.job(job).yields == yields + 1


def test_the_other_gpu_is_usable_at_once(tmp_path: Path) -> None:
    """After yielding on GPU 0 the job starts on GPU 1 at the next placement."""
    h = harness(tmp_path)
    job, pid = running_job(h)
    h.set_gpus([gpu0(pid, FOREIGN), gpu_entry(1, 50)])
    for _ in range(4):
        h.tick()
    assert h.job(job).yields == 1
    h.tick()
    rec = h.job(job)
    assert rec.state.value == "running" and rec.gpu_uuid == "GPU-sim-1"


def test_cooldown_per_gpu(tmp_path: Path) -> None:
    """The job skips the GPU it yielded on until that GPU had no other user's process for
    yield_cooldown_s; the wait says why."""
    h = harness(tmp_path)
    job, pid = running_job(h)
    yield_once(h, job, pid)
    h.set_gpus([gpu_entry(0, 50, processes=[{"pid": FOREIGN, "used_mib": 4096}])])
    for _ in range(10):
        h.tick()  # the owner is still there: the cool-down has not even begun
    assert h.state(job) == "queued" and "cool-down" in h.job(job).reason
    assert "until no process gpuspool did not start has been on it for yield_cooldown_s" in (
        h.job(job).reason
    )
    last_seen = h.now
    h.set_gpus([gpu_entry(0, 50)])
    while h.now + 1 < last_seen + COOLDOWN:
        h.tick()
        assert h.state(job) == "queued", h.now - last_seen
    for _ in range(3):
        h.tick()
    rec = h.job(job)
    assert rec.state.value == "running" and rec.gpu_uuid == "GPU-sim-0"


def test_max_yields_then_it_keeps_running_and_says_so(tmp_path: Path) -> None:
    h = harness(tmp_path, max_yields=1, yield_cooldown_s=0.0)
    job, pid = running_job(h)
    yield_once(h, job, pid)  # no cool-down: it starts again at once, beside the newcomer
    pid = h.job(job).pid
    h.set_gpus([gpu_entry(0, 50)])
    for _ in range(4):
        h.tick()
    assert h.state(job) == "running"
    h.fake.users[FOREIGN + 1] = "bob"
    with capture_logs() as logs:
        h.set_gpus([gpu0(pid, FOREIGN + 1)])
        for _ in range(8):
            h.tick()
    assert h.state(job) == "running" and h.fake.process(pid).signals == []
    limits = [e for e in logs if e["event"] == "job_yield_limit_reached"]
    assert len(limits) == 1 and limits[0]["max_yields"] == 1
    assert "no longer yields" in h.job(job).reason and f"pid {FOREIGN + 1}" in h.job(job).reason
    from gpuspool.views import status_data, status_lines

    (line,) = [x for x in status_lines(status_data(h.daemon.ledger, h.now)) if x.startswith(job)]
    assert "yielded 1 time (max_yields 1): no longer yields" in line


def test_free_memory_kept_low_by_others(tmp_path: Path) -> None:
    """yield_when_free_below_gib: free under N for stable_polls polls because of others' use
    (our job at its reported peak would leave N free) → yield; our own use never counts."""
    h = harness(tmp_path, yield_on_foreign_process=False, yield_when_free_below_gib=20.0)
    job, pid = running_job(h)  # the stub reports no peak: its need (small) is its footprint
    ours_only = gpu_entry(0, 10, total_gib=80, processes=[{"pid": pid, "used_mib": 70 * 1024}])
    h.set_gpus([ours_only])  # under 20 free, but all of it ours
    for _ in range(5):
        h.tick()
    assert h.state(job) == "running"
    h.set_gpus([gpu0(pid, FOREIGN, free=60.0)])  # a stranger, but plenty free: no yield
    for _ in range(5):
        h.tick()
    assert h.state(job) == "running"
    h.set_gpus([gpu0(pid, FOREIGN, free=5.0)])
    for _ in range(4):
        h.tick()
    assert h.state(job) == "queued"
    assert "free 5.0 GiB < 20 GiB" in str(h.job(job).last_yield["why"])


def test_reservation_falls_to_the_reported_peak(tmp_path: Path) -> None:
    """A running job reserves its need until its worker reports its peak; then the peak."""
    h = Harness(tmp_path, make_runner=fake_runner)
    job = h.start("sleep", min_free_gib="auto", batch_seconds=600.0)
    need = h.job(job).need_gib
    h.tick()
    assert h.daemon.gpu_views()[0].reserved_gib == need
    proc = h.fake.process(h.job(job).pid)
    proc.emit("progress", lines_done=2, lines_total=4, gpu_peak_gib=1.25)
    h.tick()
    assert h.daemon.gpu_views()[0].reserved_gib == 1.25
    h.set_gpus([gpu_entry(0, 49, processes=[{"pid": proc.pid, "used_mib": 1024}])])
    h.tick()
    assert h.daemon.gpu_views()[0].reserved_gib == 0.25


def test_cooldown_survives_a_restart(tmp_path: Path) -> None:
    """The GPU a job yielded on is still skipped by the daemon restarted after the yield."""
    h = harness(tmp_path)
    job, pid = running_job(h)
    yield_once(h, job, pid)
    h.daemon = h.new_daemon()
    h.set_gpus([gpu_entry(0, 50)])
    for _ in range(5):
        h.tick()
    assert h.state(job) == "queued" and "cool-down" in h.job(job).reason
    h.tick(COOLDOWN)
    for _ in range(3):
        h.tick()
    assert h.state(job) == "running"


def test_status_metrics_and_plot_show_the_yield(tmp_path: Path) -> None:
    """status says "yielded to pid N (user U) on GPU X at T"; the yields counter and the run
    duration by outcome count it; the plot marks the run's end as yielded."""
    from rich.console import Console

    from gpuspool.metrics import DaemonMetrics
    from gpuspool.plot import plot_data
    from gpuspool.views import status_data, status_lines, status_view

    h = harness(tmp_path)
    metrics = DaemonMetrics()
    job, pid = running_job(h)
    metrics.observe(h.daemon)
    yield_once(h, job, pid)
    metrics.observe(h.daemon)
    assert metrics.registry.get_sample_value("gpuspool_jobs_yielded_total") == 1
    assert (
        metrics.registry.get_sample_value(
            "gpuspool_job_duration_seconds_count", {"outcome": "yielded"}
        )
        == 1
    )
    data = status_data(h.daemon.ledger, h.now)
    (row,) = data["jobs"]
    assert row["yields"] == 1 and row["last_yield"]["pid"] == FOREIGN
    (line,) = [x for x in status_lines(data) if x.startswith(job)]
    at = iso_timestamp(row["last_yield"]["at"])
    assert f"yielded to pid {FOREIGN} (user ann) on GPU 0 (GPU-sim-0) at {at}" in line
    console = Console(width=200, record=True)  # a terminal: local time, like the rest of it
    console.print(status_view(data, width=200))
    local = time.strftime("%H:%M:%S", time.localtime(row["last_yield"]["at"]))
    assert f"yielded to pid {FOREIGN} (user ann) at {local}" in " ".join(
        console.export_text().split()
    )
    lane = plot_data(h.daemon.ledger, since=0.0, until=h.now, threshold_gib=20.0).jobs[0]
    assert [s.outcome for s in lane.segments if s.kind == "run"] == ["yielded"]


def test_submit_no_yield_writes_the_key(tmp_path: Path, capsys: Any) -> None:
    """``submit --no-yield`` puts ``yield = false`` in the job, which the daemon keeps."""
    import json

    from gpuspool.cli import main

    h = harness(tmp_path)
    cfg = tmp_path / "gpuspool.toml"
    cfg.write_text(f'spool_dir = "{h.settings.spool_dir}"\nstate_dir = "{h.settings.state_dir}"\n'
                   f'gpu_source = "file:{h.gpu_file}"\n')  # fmt: skip
    args = ["submit", "-i", str(h.data / "in.jsonl"), "-o", str(h.data / "o.jsonl"),
            "--tokenizer", "Qwen/tiny", "--no-yield", "--json"]  # fmt: skip
    code = main(["--config", str(cfg), *args])
    assert code == 0
    job = json.loads(capsys.readouterr().out)["job_id"]
    h.tick()
    assert h.job(job).spec.yield_ is False


def test_the_reported_peak_decides_whose_memory_it_is(tmp_path: Path) -> None:
    """free < N counts against others only if our job, at its footprint, would leave N: with
    the estimated need it could be ours; once the worker reports a small peak, it is not."""
    h = harness(tmp_path, yield_on_foreign_process=False, yield_when_free_below_gib=70.0)
    job = h.start("sleep", min_free_gib=20.0, batch_seconds=600.0)  # need ≈ 14 GiB
    pid = h.job(job).pid
    assert 80 - h.job(job).need_gib < 70
    h.set_gpus([gpu0(pid, FOREIGN, free=60.0)])
    for _ in range(5):
        h.tick()
    assert h.state(job) == "running"
    h.fake.process(pid).emit("progress", lines_done=2, lines_total=4, gpu_peak_gib=1.0)
    for _ in range(4):
        h.tick()
    assert h.state(job) == "queued" and h.job(job).yields == 1


def test_a_finished_jobs_process_still_listed_is_ours_for_a_while(tmp_path: Path) -> None:
    """NVML may list a worker for a poll or two after it is gone: another job of ours on that
    GPU does not take it for a newcomer (for RECENT_PID_S; a pid listed longer is a stranger's)."""
    from gpuspool.daemon import RECENT_PID_S

    h = harness(tmp_path)
    h.env["STUB_MODE"] = "sleep"
    h.set_gpus([gpu_entry(0, 60)])
    a, b = h.submit("a"), h.submit("b")
    for _ in range(8):
        h.tick()
    pa, pb = h.job(a).pid, h.job(b).pid
    assert pa and pb and h.state(a) == h.state(b) == "running"
    h.set_gpus([gpu0(pb, pa)])
    h.fake.process(pa).exit(143)
    h.fake.users[pa] = "ann"  # a process with that pid exists (a gone one never counts)
    for _ in range(int(RECENT_PID_S) - 1):
        h.tick()
    assert h.state(b) == "running" and h.job(b).yields == 0
    for _ in range(5):
        h.tick()
    assert h.job(b).yields == 1  # listed for longer than any teardown: not ours any more
