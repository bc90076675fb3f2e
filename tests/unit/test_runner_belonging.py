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
        found = [p.pid for p in psutil.process_iter() if _sid(p.pid) == job.pid]
        return found if len(found) >= 3 else None

    members = wait_until(family, timeout=10)
    orphan = [p for p in members if p != job.pid and psutil.Process(p).ppid() != job.pid]
    assert orphan, "the orphan was reparented away from the job"
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


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None
