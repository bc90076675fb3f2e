"""A scripted :class:`~gpuspool.runner.Runner` for tests of the daemon's tick: no process starts.

Each ``start`` creates a :class:`FakeProcess` and hands it to ``script``, which plays the worker:
it writes events to the job's real events file (:meth:`FakeProcess.emit`, in the protocol's
format, so the daemon's reading is exercised), and ends the process (:meth:`FakeProcess.exit`)
or leaves it running. Signals follow what a worker does: SIGTERM ends it with ``on_terminate``
(143 unless the script says otherwise; None ignores SIGTERM), SIGKILL ends it with -9.

The process table is shared between runners made with :meth:`FakeRunner.successor`, as the
kernel's is between a daemon and the one restarted after it: the successor sees the processes as
adopted (not its children), so their exit code is unknown to it, as with the real runner.
"""

from __future__ import annotations

import itertools
import os
import signal
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gpuspool.exitcodes import ExitCode
from gpuspool.protocol import encode_event, parse_go
from gpuspool.runner import JOB_ID_ENV, Exit, Launch, Started


@dataclass
class FakeProcess:
    """One scripted job process."""

    launch: Launch
    pid: int
    pid_start: float
    returncode: int | None = None
    #: Exit code when SIGTERM arrives; None: SIGTERM is ignored.
    on_terminate: int | None = 143
    signals: list[int] = field(default_factory=list)
    #: Pids of processes the worker forked (they count as the job's on a GPU).
    children: set[int] = field(default_factory=set)

    @property
    def job_id(self) -> str:
        return self.launch.env.get(JOB_ID_ENV, "")

    @property
    def uid(self) -> int:
        """The uid it runs as: the job's user, or the daemon's own."""
        return self.launch.owner[0] if self.launch.owner is not None else os.geteuid()

    @property
    def alive(self) -> bool:
        return self.returncode is None

    def emit(self, kind: str, **fields: Any) -> None:
        """Append an event to the job's events file, as the worker does."""
        self.write_events(encode_event(kind, fields))

    def write_events(self, data: bytes) -> None:
        """Append raw bytes to the events file (anything a hostile worker could write)."""
        with open(self.launch.events_path, "ab") as f:
            f.write(data)

    def exit(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code


Script = Callable[[FakeProcess], None]


class _Table:
    """The fake kernel's process table."""

    def __init__(self) -> None:
        self.procs: dict[int, FakeProcess] = {}
        self.pids = itertools.count(40000)


class FakeRunner:
    """Implements :class:`gpuspool.runner.Runner` with scripted processes."""

    def __init__(self, script: Script | None = None, *, table: _Table | None = None) -> None:
        self.script = script
        self.table = table or _Table()
        self.children: set[int] = set()
        #: When set, the next ``start`` raises it (then it is cleared).
        self.start_error: BaseException | None = None
        self.launches: list[Launch] = []
        self.removed_scratch: list[Path] = []
        #: The user each pid runs as, for :meth:`user_of` (tests name their foreign processes).
        self.users: dict[int, str] = {}
        #: Gated processes still waiting at their gate (``Launch.gated``).
        self.gated: set[int] = set()

    def successor(self) -> FakeRunner:
        """The runner of a daemon restarted over the same processes."""
        return FakeRunner(self.script, table=self.table)

    @property
    def processes(self) -> list[FakeProcess]:
        return list(self.table.procs.values())

    def process(self, pid: int | None) -> FakeProcess:
        assert pid is not None and pid in self.table.procs, f"no fake process {pid}"
        return self.table.procs[pid]

    def start(self, launch: Launch) -> Started:
        if self.start_error is not None:
            error, self.start_error = self.start_error, None
            raise error
        self.launches.append(launch)
        launch.events_path.parent.mkdir(parents=True, exist_ok=True)
        launch.events_path.write_bytes(b"")
        pid = next(self.table.pids)
        proc = FakeProcess(launch, pid, float(pid))
        self.table.procs[pid] = proc
        self.children.add(pid)
        if launch.gated:
            self.gated.add(pid)  # it waits for its go line: the script plays it from then on
        elif self.script is not None:
            self.script(proc)
        return Started(pid, proc.pid_start)

    def open_gate(self, pid: int, message: bytes) -> bool:
        """The process goes on with what the go line sets in its environment, as the worker."""
        if pid not in self.gated:
            return False
        self.gated.discard(pid)
        proc = self.table.procs[pid]
        if not proc.alive:
            return False
        go = parse_go(message.rstrip(b"\n"))
        assert go is not None, f"not a go line: {message!r}"
        proc.launch = replace(proc.launch, env={**proc.launch.env, **go})
        if self.script is not None:
            self.script(proc)
        return True

    def close_gate(self, pid: int) -> None:
        """The process stops at its gate with nothing done (exit 143), as the worker."""
        if pid in self.gated:
            self.gated.discard(pid)
            self.table.procs[pid].exit(int(ExitCode.INTERRUPTED))

    def poll(self, pid: int, pid_start: float | None) -> Exit | None:
        proc = self.table.procs.get(pid)
        if proc is None:
            return Exit(None)
        if proc.alive:
            return None
        return Exit(proc.returncode if pid in self.children else None)

    def _signal(self, pid: int, sig: int) -> bool:
        proc = self.table.procs.get(pid)
        if proc is None or not proc.alive:
            return False
        proc.signals.append(sig)
        if sig == signal.SIGKILL:
            proc.exit(-signal.SIGKILL)
        elif proc.on_terminate is not None:
            proc.exit(proc.on_terminate)
        return True

    def terminate(self, pid: int, pid_start: float | None) -> bool:
        return self._signal(pid, signal.SIGTERM)

    def kill(self, pid: int, pid_start: float | None) -> bool:
        return self._signal(pid, signal.SIGKILL)

    def is_alive(self, pid: int | None, pid_start: float | None) -> bool:
        proc = self.table.procs.get(pid) if pid is not None else None
        return proc is not None and proc.alive

    def find_job_processes(self, uids: Mapping[str, int]) -> dict[str, tuple[int, float]]:
        return {p.job_id: (p.pid, p.pid_start) for p in self.processes
                if p.alive and p.job_id in uids and p.uid == uids[p.job_id]}  # fmt: skip

    def kill_leftovers(self, uids: Mapping[str, int]) -> dict[str, list[int]]:
        killed: dict[str, list[int]] = {}
        for proc in self.processes:
            if proc.alive and proc.job_id in uids and proc.uid == uids[proc.job_id]:
                proc.exit(-signal.SIGKILL)
                killed.setdefault(proc.job_id, []).append(proc.pid)
        return killed

    def remove_scratch(self, path: Path) -> None:
        self.removed_scratch.append(path)

    def belonging(self, pids: Iterable[int], roots: Iterable[int]) -> dict[int, int]:
        jobs = set(roots)
        found: dict[int, int] = {}
        for pid in pids:
            for root in jobs:
                proc = self.table.procs.get(root)
                if pid == root or (proc is not None and pid in proc.children):
                    found[pid] = root
        return found

    def user_of(self, pid: int) -> str | None:
        return self.users.get(pid)
