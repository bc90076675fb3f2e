"""``prestart`` under attack: what a submitter's worker waiting at its gate can do to the daemon,
and what the daemon's own bookkeeping does around it.

Real processes, pipes and signals (ProcessRunner and tests/gate_worker.py, which misbehaves at
its gate as ``GATE_MODE`` says) for what a process can do; scripted processes (FakeRunner) for
the tick's decisions.
"""

from __future__ import annotations

import fcntl
import os
import signal
import struct
import sys
import termios
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from gpuspool.models import JobState
from gpuspool.privileges import Identity
from gpuspool.runner import ProcessRunner
from tests.conftest import Harness, gpu_entry, prestarting, wait_until

GATE_WORKER = str(Path(__file__).resolve().parents[1] / "gate_worker.py")
#: Longest a tick may take with a hostile worker at its gate (the machine is shared and slow).
TICK_BUDGET_S = 2.0


def real(tmp_path: Path, mode: str, **overrides: Any) -> Harness:
    """A daemon with prestart on and the gate worker; job "a" is submitted to a roomy GPU."""
    command = [sys.executable, GATE_WORKER]
    values: dict[str, Any] = {"prestart": True, "stable_polls": 3, "worker_command": command}
    values.update(overrides)
    h = Harness(tmp_path, **values)
    h.env["GATE_MODE"] = mode
    h.env["STUB_MODE"] = "ok"
    h.set_gpus([gpu_entry(0, 50)])
    return h


def runner(h: Harness) -> ProcessRunner:
    assert isinstance(h.runner, ProcessRunner)
    return h.runner


def timed_tick(h: Harness) -> None:
    t = time.monotonic()
    h.tick()
    assert time.monotonic() - t < TICK_BUDGET_S


def prestarted(h: Harness) -> tuple[int, float]:
    current = h.daemon._prestarted
    assert current is not None
    return current.pid, current.pid_start


def gate_fd_of(pid: int) -> int:
    return int(psutil.Process(pid).environ()["GPUSPOOL_GATE_FD"])


def queued_bytes(fd: int) -> int:
    buf = fcntl.ioctl(fd, termios.FIONREAD, struct.pack("i", 0))
    return int(struct.unpack("i", buf)[0])


def zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def my_zombies() -> list[int]:
    """This process's children that are zombies, but for the ``rm -rf`` of a scratch folder:
    those are reaped at the next removal (``runner.remove_scratch``), never waited for."""
    return [p.pid for p in psutil.Process().children() if zombie(p.pid) and p.name() != "rm"]


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- what the worker can do at its gate: the tick goes on, the job starts afresh ----------------


@pytest.mark.parametrize("mode", ["close", "fill"])
def test_a_worker_that_closes_or_fills_its_gate_gets_a_fresh_start_and_stalls_nothing(
    tmp_path: Path, mode: str
) -> None:
    h = real(tmp_path, mode)
    job = h.submit("a")
    timed_tick(h)
    pid, _ = prestarted(h)
    gate = runner(h)._gates[pid]
    if mode == "close":
        child_gate = gate_fd_of(pid)
        wait_until(lambda: not Path(f"/proc/{pid}/fd/{child_gate}").exists())
    else:
        wait_until(lambda: queued_bytes(gate) >= 60_000)
    timed_tick(h)
    timed_tick(h)  # the GPU has settled: the go line cannot be written, the job starts afresh
    rec = h.job(job)
    assert rec.state == JobState.RUNNING and rec.pid != pid
    timed_tick(h)
    assert pid not in runner(h)._children and not zombie(pid)  # killed and reaped
    assert runner(h)._gates == {}
    assert h.settle(job) == "done"


def test_a_worker_stopped_at_its_gate_is_its_own_jobs_problem_and_is_stopped_on_cancel(
    tmp_path: Path,
) -> None:
    """SIGSTOP at the gate: the go line still lands (the pipe holds it), the job is running
    in that process; cancelling it ends it after the grace (SIGKILL reaches a stopped process)."""
    h = real(tmp_path, "stop")
    job = h.submit("a")
    timed_tick(h)
    pid, _ = prestarted(h)
    wait_until(lambda: psutil.Process(pid).status() == psutil.STATUS_STOPPED)
    timed_tick(h)
    timed_tick(h)
    assert h.job(job).pid == pid
    h.daemon.ledger.request_cancel(job, now=h.now)
    for _ in range(4):
        timed_tick(h)
    assert h.settle(job) == "cancelled"
    assert not zombie(pid) and pid not in runner(h)._children


def test_a_worker_killed_just_before_its_go_line_gives_way_to_a_fresh_start(
    tmp_path: Path,
) -> None:
    h = real(tmp_path, "ignore")
    job = h.submit("a")
    timed_tick(h)
    timed_tick(h)
    pid, _ = prestarted(h)
    os.kill(pid, signal.SIGKILL)  # its user may, between two ticks
    wait_until(lambda: zombie(pid))
    timed_tick(h)
    rec = h.job(job)
    assert rec.state == JobState.RUNNING and rec.pid != pid
    assert h.settle(job) == "done"
    assert rec.attempts == 0 and not zombie(pid)


def test_a_worker_gone_before_its_go_line_is_never_taken_as_the_jobs_process(
    tmp_path: Path,
) -> None:
    h = real(tmp_path, "holder", stable_polls=2)
    job = h.submit("a")
    timed_tick(h)  # prestarted: the worker forks a child holding the gate and exits 3
    pid, _ = prestarted(h)
    wait_until(lambda: zombie(pid))  # gone, not yet reaped: the next tick's start comes first
    timed_tick(h)
    rec = h.job(job)
    try:
        assert rec.pid != pid, "the job runs in a process that had already exited"
    finally:
        h.settle(job)
        assert h.job(job).attempts == 0


# -- the daemon's bookkeeping: no descriptor, zombie or process left behind ---------------------


def test_many_prestarts_and_dismissals_leave_no_descriptor_zombie_or_process(
    tmp_path: Path,
) -> None:
    """The real runner: the worker is started at its gate and dismissed 25 times (prestart
    turned on and off by a config reload); the daemon ends with the descriptors it began with,
    no zombie child and no worker left."""
    h = real(tmp_path, "ignore", stable_polls=10_000)  # never starts: it stays nearest
    job = h.submit("a")
    h.settle_intake()
    before = fd_count()
    zombies_before = set(my_zombies())  # earlier tests' children, not this daemon's
    pids = []
    for n in range(25):
        h.daemon.settings = h.settings.model_copy(update={"prestart": n % 2 == 0})
        h.tick()
        if n % 2 == 0:
            pids.append(prestarted(h)[0])
    assert len(set(pids)) == 13 and h.state(job) == "queued"
    h.daemon.settings = h.settings.model_copy(update={"prestart": False})

    def all_reaped() -> bool:
        h.tick(0.1)
        return not h.daemon._killed

    wait_until(all_reaped)
    assert runner(h)._gates == {} and runner(h)._children == {}
    assert fd_count() == before
    assert set(my_zombies()) <= zombies_before
    assert not any(psutil.pid_exists(p) and not zombie(p) for p in pids)


def test_a_job_cancelled_while_its_worker_waits_leaves_no_scratch_folder(
    tmp_path: Path,
) -> None:
    h = real(tmp_path, "ignore", stable_polls=10_000)
    job = h.submit("a")
    h.tick()
    scratch = h.daemon.scratch_path(job)
    assert scratch.is_dir()  # made for the prestarted worker (its TMPDIR)
    h.daemon.ledger.request_cancel(job, now=h.now)
    h.tick()
    assert h.daemon._prestarted is None and h.state(job) == "cancelled"
    assert not scratch.exists()


def test_a_stopping_daemon_dismisses_its_waiting_worker_and_a_restart_forgets_nothing(
    tmp_path: Path,
) -> None:
    """The daemon goes away while the worker waits: the worker reads the end of its gate and
    stops with nothing done; the restarted daemon finds the job queued and starts it."""
    h = real(tmp_path, "slow")
    h.env["GATE_SLEEP"] = "0"
    job = h.submit("a")
    h.tick()
    pid, start = prestarted(h)
    runner(h).close_gate(pid)  # what a daemon killed with SIGKILL leaves: the end of its gate
    wait_until(lambda: runner(h).poll(pid, start) is not None)
    h.daemon = h.new_daemon()
    for _ in range(4):
        h.tick()
    assert h.job(job).pid != pid
    assert h.settle(job) == "done"


def test_a_worker_still_importing_when_the_daemon_crashed_after_the_claim_is_requeued(
    tmp_path: Path,
) -> None:
    """The daemon dies between claiming the job and writing its go line, while the worker
    still imports: the restarted daemon finds that worker by the job's id and adopts it; it
    ends at its closed gate, and the job is queued again (interrupted: no attempt counted)."""
    h = real(tmp_path, "slow")
    h.env["GATE_SLEEP"] = "3"
    job = h.submit("a")
    h.tick()
    pid, _ = prestarted(h)
    rec = h.job(job)
    h.daemon._claim(rec, "GPU-sim-0", h.settings.logs_dir / f"{job}.log", h.now)
    runner(h).close_gate(pid)  # the crash: the daemon's end of the gate is closed
    h.daemon = h.new_daemon()  # a restarted daemon: the worker is not its child
    assert h.job(job).pid == pid  # adopted
    wait_until(lambda: not psutil.pid_exists(pid) or zombie(pid), timeout=30)
    h.tick()
    rec = h.job(job)
    assert rec.state == JobState.INTERRUPTED and rec.attempts == 0
    for _ in range(4):
        h.tick()
    assert h.job(job).pid not in (None, pid)
    assert h.settle(job) == "done"


# -- the tick's decisions (scripted processes) ---------------------------------------------------


def test_no_worker_waits_for_a_gpu_another_job_just_took(tmp_path: Path) -> None:
    """One GPU, room for one job: when the first starts, the second's GPU has no room left
    (1.5 GiB available, need 20), yet its worker is started and kept for ten minutes."""
    h = prestarting(tmp_path)
    h.set_gpus([gpu_entry(0, 30)])
    first = h.submit("a")
    second = h.submit("b")
    for _ in range(3):
        h.tick()
    assert h.state(first) == "running" and h.state(second) == "queued"
    h.set_gpus([gpu_entry(0, 10)])  # the first job's worker holds its memory
    waited = 0.0
    while h.daemon._prestarted is not None and waited < 900:
        h.tick(30.0)
        waited += 30.0
    assert h.state(second) == "queued"
    assert waited <= 30.0, f"the second job's worker waited {waited:.0f} s at a full GPU"


def test_a_worker_started_with_groups_its_user_no_longer_has_is_not_let_go_on(
    tmp_path: Path,
) -> None:
    # Root at intake (its scan reads the test's files); a user with groups from the prestart on.
    groups: list[tuple[int, ...] | None] = [None]

    def identity_for(uid: int) -> Identity:
        if groups[0] is None:
            return Identity(uid, 0, (0,), "root", "/root")
        return Identity(65534, 65534, groups[0], "nobody", "/")

    h = prestarting(tmp_path, identity_for=identity_for)
    h.set_gpus([gpu_entry(0, 50)])
    job = h.submit("a")
    h.settle_intake()
    groups[0] = (65534, 4242)
    h.tick()
    (first,) = h.fake.launches
    assert first.gated and "--groups=65534,4242" in first.switch
    groups[0] = (65534,)  # removed from group 4242 (its data, say) while the worker waited
    h.tick()
    h.tick()
    rec = h.job(job)
    assert rec.state == JobState.RUNNING
    switch = list(h.fake.process(rec.pid).launch.switch)
    assert "--groups=65534" in switch, switch


def test_a_go_line_that_cannot_be_written_leaves_no_worker_waiting(tmp_path: Path) -> None:
    h = prestarting(tmp_path)
    h.set_gpus([gpu_entry(0, 50, uuid="GPU-" + "9" * 600)])
    job = h.submit("a")
    for _ in range(3):
        h.tick()
    pids = [pid for pid, proc in h.fake.table.procs.items() if proc.alive]
    assert h.state(job) in ("running", "failed")
    assert h.fake.gated == set(), (h.state(job), pids)


@pytest.mark.parametrize("how", ["hold", "drain"])
def test_a_waiting_worker_is_dismissed_when_its_job_is_held_or_the_host_drains(
    tmp_path: Path, how: str
) -> None:
    h = prestarting(tmp_path)
    h.set_gpus([gpu_entry(0, 50)])
    job = h.submit("a")
    h.tick()
    pid = prestarted(h)[0]
    if how == "hold":
        h.daemon.ledger.transition(job, JobState.HELD, now=h.now, reason="held by user")
    elif how == "drain":
        h.daemon.ledger.set_draining(True)
    h.tick()
    assert h.daemon._prestarted is None and not h.fake.process(pid).alive
    assert h.state(job) in ("queued", "held")


def test_a_user_at_their_running_limit_gets_no_prestarted_worker(tmp_path: Path) -> None:
    h = prestarting(tmp_path, max_running_per_user=1)
    h.set_gpus([gpu_entry(0, 50), gpu_entry(1, 50)])
    first = h.submit("a")
    for _ in range(3):
        h.tick()
    assert h.state(first) == "running"
    second = h.submit("b")
    for _ in range(3):
        h.tick()
    assert h.state(second) == "queued"
    gated = [launch.env["GPUSPOOL_JOB_ID"] for launch in h.fake.launches
             if launch.gated]  # fmt: skip
    assert second not in gated


def test_a_job_cooling_down_on_its_only_gpu_gets_no_prestarted_worker(tmp_path: Path) -> None:
    h = prestarting(tmp_path, yield_cooldown_s=600.0)
    h.set_gpus([gpu_entry(0, 50)])
    job = h.submit("a")
    h.settle_intake()
    h.daemon.yield_watch.yielded(job, "GPU-sim-0", h.now)
    for _ in range(2):
        h.tick()
        h.set_gpus([gpu_entry(0, 5)])  # another tenant comes and goes: the reading settles anew
        h.tick()
        h.set_gpus([gpu_entry(0, 50)])
    for _ in range(3):
        h.tick()
    assert h.state(job) == "queued"
    assert not [launch for launch in h.fake.launches if launch.gated]


def test_a_stopping_daemon_reaps_the_worker_it_dismissed(tmp_path: Path) -> None:
    h = real(tmp_path, "ignore", stable_polls=10_000)
    h.submit("a")
    h.tick()
    pid, _ = prestarted(h)
    h.daemon.stop_all(h.now)
    wait_until(lambda: zombie(pid) or not psutil.pid_exists(pid))
    for _ in range(3):
        h.tick()
    assert not zombie(pid)


def test_jobs_taking_turns_at_the_head_of_the_line_get_one_prestart_each(tmp_path: Path) -> None:
    """A submitter swaps free memory between two GPUs, each pinned by one of their jobs, at
    every poll: each job's worker is started once while it waits, not once per poll; a hold
    and a release do not start the count again."""
    h = prestarting(tmp_path, stable_polls=3)
    a = h.submit("a", gpus=["GPU-sim-0"])
    b = h.submit("b", gpus=["GPU-sim-1"])
    h.settle_intake()
    room = [[gpu_entry(0, 50), gpu_entry(1, 5)], [gpu_entry(0, 5), gpu_entry(1, 50)]]
    for i in range(12):
        h.set_gpus(room[i % 2])
        h.tick()
        if i == 5:
            h.daemon.ledger.transition(a, JobState.HELD, now=h.now, reason="held by user")
        if i == 7:
            h.daemon.ledger.transition(a, JobState.QUEUED, now=h.now, reason="released")
    assert h.state(a) == "queued" and h.state(b) == "queued"
    gated = [launch.env["GPUSPOOL_JOB_ID"] for launch in h.fake.launches if launch.gated]
    assert sorted(gated) == sorted([a, b])
