"""Starting and stopping job processes. The only module that imports subprocess.

Each job runs as an argv list (no shell) in its own process session, so stopping it reaches the
whole group: SIGTERM first, SIGKILL after a grace period. Output goes to the job's log file, which
the daemon reads for progress events; because nothing is piped, a job outlives a daemon crash and
is adopted again on restart (by pid and process start time, so a reused pid is never mistaken
for it).
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

#: Set in every job's environment, so a job started just before a crash can be found again.
JOB_ID_ENV = "GPUSPOOL_JOB_ID"


@dataclass(frozen=True, slots=True)
class Launch:
    """Everything needed to start one job process."""

    argv: Sequence[str]
    env: Mapping[str, str]
    log_path: Path
    cwd: Path
    #: Extra ``subprocess.Popen`` arguments (user, group, extra_groups, umask) for the identity.
    popen_kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Started:
    pid: int
    #: Process creation time (psutil), to tell this process from a later one with the same pid.
    pid_start: float


@dataclass(frozen=True, slots=True)
class Exit:
    """A process that is gone. ``returncode`` is None when it was not our child (adopted)."""

    returncode: int | None


class Runner:
    """Owns the job processes this daemon started (and the ones it adopted)."""

    def __init__(self) -> None:
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, launch: Launch) -> Started:
        launch.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(launch.log_path, "ab", buffering=0) as log:
            proc = subprocess.Popen(
                list(launch.argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(launch.env),
                cwd=launch.cwd,
                start_new_session=True,
                close_fds=True,
                **dict(launch.popen_kwargs),
            )
        self._children[proc.pid] = proc
        try:
            created = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            created = 0.0
        return Started(proc.pid, created)

    def poll(self, pid: int, pid_start: float | None) -> Exit | None:
        """None while the job's process runs; its ``Exit`` once it is gone."""
        child = self._children.get(pid)
        if child is not None:
            code = child.poll()
            if code is None:
                return None
            del self._children[pid]
            return Exit(code)
        return None if is_alive(pid, pid_start) else Exit(None)

    def signal_group(self, pid: int, pid_start: float | None, sig: int) -> bool:
        """Send ``sig`` to the job's process group; False if the job is already gone."""
        if pid not in self._children and not is_alive(pid, pid_start):
            return False
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return False
        return True

    def terminate(self, pid: int, pid_start: float | None) -> bool:
        return self.signal_group(pid, pid_start, signal.SIGTERM)

    def kill(self, pid: int, pid_start: float | None) -> bool:
        return self.signal_group(pid, pid_start, signal.SIGKILL)


def is_alive(pid: int | None, pid_start: float | None) -> bool:
    """Whether ``pid`` is still the process that was started at ``pid_start`` (and not a zombie)."""
    if pid is None:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        created = proc.create_time()
    except psutil.Error:
        return False
    return pid_start is None or pid_start == 0.0 or abs(created - pid_start) < 0.01


def _job_processes() -> Iterator[tuple[psutil.Process, str]]:
    """Every live process that carries ``GPUSPOOL_JOB_ID``, with that job id."""
    for proc in psutil.process_iter(["pid", "create_time"]):
        try:
            job_id = proc.environ().get(JOB_ID_ENV)
        except (psutil.Error, OSError):
            continue
        if job_id:
            yield proc, job_id


def find_job_processes() -> dict[str, tuple[int, float]]:
    """Live processes carrying ``GPUSPOOL_JOB_ID``: job id → (pid, start time) of the oldest."""
    found: dict[str, tuple[int, float]] = {}
    for proc, job_id in _job_processes():
        created = proc.info["create_time"]
        if job_id not in found or created < found[job_id][1]:
            found[job_id] = (proc.info["pid"], created)
    return found


def kill_leftovers(job_id: str) -> list[int]:
    """SIGKILL every process still carrying ``job_id`` (a finished job's stray children,
    e.g. loaders of a worker that was killed); returns their pids."""
    killed = []
    for proc, owner in _job_processes():
        if owner != job_id:
            continue
        try:
            proc.kill()
        except psutil.Error:
            continue
        killed.append(proc.info["pid"])
    return killed
