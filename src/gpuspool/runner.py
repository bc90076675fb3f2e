"""Starting and stopping job processes: the ``Runner`` protocol and the real ``ProcessRunner``.

The daemon talks to job processes only through :class:`Runner`, so its tick can be tested with
the scripted :class:`gpuspool.runner_fake.FakeRunner` (no process started). ``ProcessRunner`` is
the only module that imports ``subprocess`` for jobs and ``psutil``.

Each job runs as an argv list (no shell) in its own process session, so stopping it reaches the
whole group: SIGTERM first, SIGKILL after a grace period. It starts in ``/`` (a user folder
there would be opened as root) and switches to its user before anything else runs, by
``setpriv`` after the exec (``Launch.switch``): ``Popen`` returns before the process is the
user's, so they cannot hold it by stopping the process before its exec. stdout and stderr go
to the job's human log; events go to a per-job events file handed over as an inherited
descriptor (``GPUSPOOL_EVENTS_FD``, see :mod:`gpuspool.protocol`). Because nothing is piped, a
job outlives a daemon crash and is adopted again on restart (by pid and process start time, so
a reused pid is never mistaken for it).

Each job also gets a private scratch folder (its ``TMPDIR`` and caches), created here for its
user and removed when the job is filed as finished.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import stat
import subprocess
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil

from gpuspool.protocol import EVENTS_FD_ENV, GATE_FD_ENV

#: Set in every job's environment, so a job started just before a crash can be found again.
JOB_ID_ENV = "GPUSPOOL_JOB_ID"
#: The folder a job process starts in: nothing of any user's.
NEUTRAL_CWD = "/"


@dataclass(frozen=True, slots=True)
class Launch:
    """Everything needed to start one job process."""

    argv: Sequence[str]
    env: Mapping[str, str]
    #: The human log: the process's stdout and stderr, appended.
    log_path: Path
    #: The events file, truncated at each start and handed over as ``GPUSPOOL_EVENTS_FD``.
    events_path: Path
    #: The job's private scratch folder (created for ``owner``), or None for none.
    scratch_dir: Path | None = None
    #: (uid, gid) the scratch folder belongs to; None: the daemon's own user.
    owner: tuple[int, int] | None = None
    #: Extra ``subprocess.Popen`` arguments (the umask) for the identity.
    popen_kwargs: Mapping[str, Any] = field(default_factory=dict)
    #: Put before ``argv``: switches to the job's user after the exec (``setpriv``), so the
    #: start never waits on a process its user could already stop (see ``privileges``).
    switch: Sequence[str] = ()
    #: Started before its GPU is free (``prestart``): the process gets the read end of a pipe
    #: (``GPUSPOOL_GATE_FD``) and waits on it for :meth:`Runner.open_gate`.
    gated: bool = False


@dataclass(frozen=True, slots=True)
class Started:
    pid: int
    #: Process creation time (psutil), to tell this process from a later one with the same pid.
    pid_start: float


@dataclass(frozen=True, slots=True)
class Exit:
    """A process that is gone. ``returncode`` is None when it was not our child (adopted)."""

    returncode: int | None


class Runner(Protocol):
    """What the daemon needs of job processes. Every call is about one job's process (by pid and
    start time) or one job (by id); none raises for a process that is gone."""

    def start(self, launch: Launch) -> Started:
        """Start the job's process; raises (any exception) if it cannot be started."""
        ...

    def open_gate(self, pid: int, message: bytes) -> bool:
        """Write ``message`` (one go line) to a gated process and close its gate; False when the
        process is not waiting on a gate of ours any more (it is gone, or closed its end)."""
        ...

    def close_gate(self, pid: int) -> None:
        """Close a gated process's gate: it stops without doing anything (nothing if none)."""
        ...

    def poll(self, pid: int, pid_start: float | None) -> Exit | None:
        """None while the process runs; its ``Exit`` once it is gone."""
        ...

    def terminate(self, pid: int, pid_start: float | None) -> bool:
        """SIGTERM to the job's process group; False if it is already gone."""
        ...

    def kill(self, pid: int, pid_start: float | None) -> bool:
        """SIGKILL to the job's process group; False if it is already gone."""
        ...

    def is_alive(self, pid: int | None, pid_start: float | None) -> bool:
        """Whether ``pid`` is still the process started at ``pid_start``."""
        ...

    def find_job_processes(self, uids: Mapping[str, int]) -> dict[str, tuple[int, float]]:
        """Live processes of the jobs in ``uids`` (job id → the uid the job runs as): job id →
        (pid, start time) of the oldest carrying that id and run by that uid."""
        ...

    def kill_leftovers(self, uids: Mapping[str, int]) -> dict[str, list[int]]:
        """Kill every process still carrying the id of a job in ``uids`` and run by that job's
        uid; the pids killed, by job id (jobs with none left out). One pass over the process
        table for all the jobs that ended in a tick."""
        ...

    def remove_scratch(self, path: Path) -> None:
        """Remove a finished job's scratch folder (nothing if it is not there)."""
        ...

    def belonging(self, pids: Iterable[int], roots: Iterable[int]) -> dict[int, int]:
        """Which of ``pids`` (processes a GPU shows) are job processes: each one that is a root
        (a job's pid), in a root's session or below a root, mapped to that root."""
        ...

    def user_of(self, pid: int) -> str | None:
        """The name of the user ``pid`` runs as (its uid as a string when no account has it);
        None when the process is gone."""
        ...


class ProcessRunner:
    """Owns the job processes this daemon started (and the ones it adopted)."""

    def __init__(self) -> None:
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        #: The write end of each gated process's gate, until it is opened or closed.
        self._gates: dict[int, int] = {}

    def start(self, launch: Launch) -> Started:
        launch.log_path.parent.mkdir(parents=True, exist_ok=True)
        launch.events_path.parent.mkdir(parents=True, exist_ok=True)
        if launch.scratch_dir is not None:
            make_scratch(launch.scratch_dir, launch.owner)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        events = os.open(launch.events_path, flags, 0o600)
        env = {**launch.env, EVENTS_FD_ENV: str(events)}
        passed = [events]
        gate = None
        try:
            if launch.gated:
                # Our end never blocks: the one go line fits an empty pipe whatever the worker does.
                gate_r, gate = os.pipe2(os.O_CLOEXEC)
                os.set_blocking(gate, False)
                passed.append(gate_r)
                env[GATE_FD_ENV] = str(gate_r)
            with open(launch.log_path, "ab", buffering=0) as log:
                proc = subprocess.Popen(
                    [*launch.switch, *launch.argv],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=NEUTRAL_CWD,
                    start_new_session=True,
                    close_fds=True,
                    pass_fds=tuple(passed),
                    **dict(launch.popen_kwargs),
                )
        except BaseException:
            if gate is not None:
                os.close(gate)
            raise
        finally:
            for fd in passed:
                os.close(fd)
        self._children[proc.pid] = proc
        if gate is not None:
            self._gates[proc.pid] = gate
        try:
            created = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            created = 0.0
        return Started(proc.pid, created)

    def open_gate(self, pid: int, message: bytes) -> bool:
        gate = self._gates.pop(pid, None)
        if gate is None:
            return False
        try:
            return os.write(gate, message) == len(message)
        except OSError:  # EPIPE: the process is gone or closed its end
            return False
        finally:
            os.close(gate)

    def close_gate(self, pid: int) -> None:
        gate = self._gates.pop(pid, None)
        if gate is not None:
            os.close(gate)

    def poll(self, pid: int, pid_start: float | None) -> Exit | None:
        """None while the job's process runs; its ``Exit`` once it is gone."""
        child = self._children.get(pid)
        if child is not None:
            code = child.poll()
            if code is None:
                return None
            del self._children[pid]
            self.close_gate(pid)
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

    def is_alive(self, pid: int | None, pid_start: float | None) -> bool:
        return is_alive(pid, pid_start)

    def find_job_processes(self, uids: Mapping[str, int]) -> dict[str, tuple[int, float]]:
        return find_job_processes(uids)

    def kill_leftovers(self, uids: Mapping[str, int]) -> dict[str, list[int]]:
        return kill_leftovers(uids)

    def remove_scratch(self, path: Path) -> None:
        remove_scratch(path)

    def belonging(self, pids: Iterable[int], roots: Iterable[int]) -> dict[int, int]:
        return belonging(pids, roots)

    def user_of(self, pid: int) -> str | None:
        return user_of(pid)


def make_scratch(path: Path, owner: tuple[int, int] | None) -> None:
    """Create ``path`` (mode 0700) for ``owner``; keep it if it is already that owner's folder.

    Its parent is created 0711 and must be the daemon's alone, so no job can put anything at
    ``path`` but the daemon: a folder found there is this job's own from an earlier attempt.
    """
    parent = path.parent
    _move_aside_if_planted(parent)
    parent.mkdir(mode=0o711, parents=True, exist_ok=True)
    st = os.lstat(parent)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022 or not stat.S_ISDIR(st.st_mode):
        raise RuntimeError(f"scratch folder {parent} must be a directory owned by the daemon's "
                           "user and writable by nobody else")  # fmt: skip
    if not st.st_mode & 0o001:  # the daemon's umask (0077 under systemd) took users' x bit
        os.chmod(parent, 0o711)
    uid, gid = owner if owner is not None else (os.geteuid(), os.getegid())
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if stat.S_ISDIR(st.st_mode) and st.st_uid == uid:
            return
        remove_scratch(path)
    os.mkdir(path, 0o700)
    os.chmod(path, 0o700)  # the daemon's umask must not narrow it further
    if owner is not None:
        os.chown(path, uid, gid, follow_symlinks=False)


#: A scratch folder being removed is first renamed to ``<TRASH_PREFIX><job id>-<random>``.
TRASH_PREFIX = ".removing-"
#: The ``rm`` processes still removing scratch folders (reaped as later ones start).
_removers: list[subprocess.Popen[bytes]] = []


def _move_aside_if_planted(parent: Path) -> None:
    """Rename ``parent`` to ``<name>.not-ours-<random>`` if another user made it first in a
    shared sticky folder (``/var/tmp``, before the installer or the first job did): otherwise
    every job would fail on it. Nothing else is moved: a wrong folder of the daemon's own user
    or in a private place is the operator's to fix, and is refused by :func:`make_scratch`."""
    try:
        st = os.lstat(parent)
        shared = os.stat(parent.parent).st_mode
    except FileNotFoundError:
        return
    if st.st_uid == os.geteuid() or not (shared & stat.S_ISVTX and shared & 0o002):
        return
    os.rename(parent, parent.with_name(f"{parent.name}.not-ours-{os.urandom(4).hex()}"))


def remove_scratch(path: Path) -> None:
    """Remove a scratch folder and what the job left in it, without waiting for it.

    The folder is its user's: they may have filled it with millions of files or a tree deeper
    than Python recursion goes. It is renamed aside at once (the job's path is free again) and
    removed by ``rm -rf`` (which never follows links, whatever the depth) in a child process
    nobody waits for, so no tick waits on what a user left there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{os.urandom(4).hex()}")
    os.rename(path, trash)
    _removers[:] = [p for p in _removers if p.poll() is None]
    with contextlib.suppress(OSError):  # no process now: the renamed folder stays, out of the way
        _removers.append(
            subprocess.Popen(
                ["rm", "-rf", "--one-file-system", "--", str(trash)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=NEUTRAL_CWD,
                env={"PATH": "/usr/bin:/bin"},
                start_new_session=True,
                close_fds=True,
            )
        )


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


def _job_processes(uids: Mapping[str, int]) -> Iterator[tuple[psutil.Process, str]]:
    """Every live process that carries ``GPUSPOOL_JOB_ID`` of a job in ``uids``, with that job
    id, if its real uid is the job's. Job ids are public (everyone's status shows them) and
    anyone may put one in their environment: a process of another user is never the job's."""
    wanted = set(uids.values())
    for proc in psutil.process_iter(["pid", "create_time", "uids"]):
        owner = proc.info["uids"]
        if owner is None or owner.real not in wanted:
            continue  # no job's user: its environment is not read at all
        try:
            job_id = proc.environ().get(JOB_ID_ENV)
        except (psutil.Error, OSError):
            continue
        if job_id is not None and job_id in uids and owner.real == uids[job_id]:
            yield proc, job_id


def find_job_processes(uids: Mapping[str, int]) -> dict[str, tuple[int, float]]:
    """Live processes of the jobs in ``uids``, run by the job's uid: job id → (pid, start
    time) of the oldest."""
    found: dict[str, tuple[int, float]] = {}
    for proc, job_id in _job_processes(uids):
        created = proc.info["create_time"]
        if job_id not in found or created < found[job_id][1]:
            found[job_id] = (proc.info["pid"], created)
    return found


def kill_leftovers(uids: Mapping[str, int]) -> dict[str, list[int]]:
    """SIGKILL every process still carrying the id of a finished job in ``uids`` and run by
    that job's uid (a finished job's stray children, e.g. loaders of a worker that was killed);
    returns their pids by job id. The process table is read once, whatever the number of jobs:
    a full scan costs tens of milliseconds, and a busy tick files several jobs."""
    killed: dict[str, list[int]] = {}
    if not uids:
        return killed
    for proc, job_id in _job_processes(uids):
        try:
            proc.kill()
        except psutil.Error:
            continue
        killed.setdefault(job_id, []).append(proc.info["pid"])
    return killed


def belonging(pids: Iterable[int], roots: Iterable[int]) -> dict[int, int]:
    """Which of ``pids`` belong to a job process in ``roots``: the root itself, a process in
    its session (each job starts a session of its own, and a loader the worker forks stays in
    it even when its parent is gone) or one of its descendants. Only the given pids and their
    ancestors are looked at (never the whole process table), each ancestor once per call: a
    user may put hundreds of processes on the GPUs, mostly children of one parent."""
    jobs = set(roots)
    above: dict[int, int | None] = {}
    found: dict[int, int] = {}
    for pid in pids:
        if pid in jobs:
            found[pid] = pid
            continue
        try:
            sid = os.getsid(pid)
        except OSError:
            sid = -1
        if sid in jobs:
            found[pid] = sid
            continue
        root = _job_above(pid, jobs, above)
        if root is not None:
            found[pid] = root
    return found


def _job_above(pid: int, jobs: set[int], above: dict[int, int | None]) -> int | None:
    """The nearest ancestor of ``pid`` in ``jobs``, if any. ``above`` remembers, for each
    process walked through, the same answer, so a parent shared by many is read once."""
    chain: list[int] = []
    root = None
    parent = _parent(pid)
    while parent is not None and len(chain) < _MAX_DEPTH:
        if parent in above:
            root = above[parent]
            break
        if parent in jobs:
            root = parent
            break
        chain.append(parent)
        parent = _parent(parent)
    for walked in chain:
        above[walked] = root
    return root


#: Ancestors walked at most per process (the kernel's tree is far shallower; a bound all the same).
_MAX_DEPTH = 4096


def _parent(pid: int) -> int | None:
    """``pid``'s parent (None for a gone process and above the first process)."""
    try:
        ppid = psutil.Process(pid).ppid()
    except psutil.Error:
        return None
    return ppid if ppid > 0 else None


def user_of(pid: int) -> str | None:
    """The account name of the real uid ``pid`` runs as. Only the uid is read: a process
    controls its name, arguments and environment, not its uid."""
    try:
        uid = psutil.Process(pid).uids().real
    except psutil.Error:
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
