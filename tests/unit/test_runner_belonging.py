"""Which processes on a GPU are a job's (the real runner, real processes): the job's own, its
children, and what stays in its session after its parent is gone; anyone else's is not."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator

import psutil
import pytest

from gpuspool.runner import belonging, user_of
from tests.conftest import wait_until


@pytest.fixture
def job() -> Iterator[subprocess.Popen[bytes]]:
    """A "worker" in a session of its own (as the runner starts jobs) that forks a loader
    and an orphan: a grandchild whose parent exits at once (reparented, still in the session)."""
    proc = subprocess.Popen(["sh", "-c", "sleep 60 & (sleep 60 &) ; wait"], start_new_session=True)
    yield proc
    os.killpg(proc.pid, 9)
    proc.wait()


def test_children_and_session_members_belong_to_the_job(job: subprocess.Popen[bytes]) -> None:
    def family() -> list[int] | None:
        """The session once the orphan's parent has exited: the job, its child, the orphan."""
        found = [p.pid for p in psutil.process_iter() if _sid(p.pid) == job.pid]
        orphans = [p for p in found if p != job.pid and _ppid(p) not in (job.pid, None)]
        return found if len(found) == 3 and orphans else None

    members = wait_until(family, timeout=10)
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        found = belonging([*members, stranger.pid, os.getpid()], [job.pid])
    finally:
        stranger.kill()
        stranger.wait()
    assert found == dict.fromkeys(members, job.pid)


def test_a_process_below_a_job_in_the_same_session_is_found_by_ancestry() -> None:
    """A child that left the job's session (setsid) still belongs to it through its parents."""
    proc = subprocess.Popen(["sh", "-c", "setsid sleep 60 & wait"], start_new_session=True)
    child = wait_until(lambda: psutil.Process(proc.pid).children(), timeout=10)[0]
    try:
        wait_until(lambda: _sid(child.pid) == child.pid, timeout=10)
        assert belonging([child.pid], [proc.pid]) == {child.pid: proc.pid}
    finally:
        child.kill()
        os.killpg(proc.pid, 9)
        proc.wait()


def test_user_of_names_the_real_uid_and_a_gone_process_is_none() -> None:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        import pwd

        assert user_of(proc.pid) == pwd.getpwuid(os.getuid()).pw_name
    finally:
        proc.kill()
        proc.wait()
    time.sleep(0.05)
    assert user_of(proc.pid) is None


def _ppid(pid: int) -> int | None:
    try:
        return psutil.Process(pid).ppid()
    except psutil.Error:
        return None


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def test_many_processes_on_a_gpu_cost_one_look_each(monkeypatch: pytest.MonkeyPatch) -> None:
    """A user may put hundreds of small processes on the GPUs; the daemon looks at them at every
    poll. Their common ancestors are read once per poll, not once per process (walking each
    one's parents took 0.7 ms a process: a second per tick for 1,400)."""
    n = 300
    procs = [subprocess.Popen(["sleep", "60"]) for _ in range(n)]
    made: list[int | None] = []

    class Counting(psutil.Process):
        def __init__(self, pid: int | None = None) -> None:
            made.append(pid)
            super().__init__(pid)

    monkeypatch.setattr(psutil, "Process", Counting)
    try:
        job = procs[0].pid  # one of them stands for a job: it belongs, the others do not
        found = belonging([p.pid for p in procs], [job])
    finally:
        monkeypatch.undo()
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
    assert found == {job: job}
    depth = len(psutil.Process().parents()) + 1
    # psutil makes two objects per look; walking every process's parents made over 20
    assert len(made) <= 2 * (n + depth), f"{len(made)} process objects for {n} processes"
