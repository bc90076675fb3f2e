"""Which attempt owns an output: the owner file beside ``OUT.partial`` (torch-free).

On a shared ledger several hosts may, for a while, each run a worker for the same job: a host
whose daemon hung while its workers ran on, or a frozen host in the moments after it resumes,
still has a worker going while another host has claimed the job again. The ledger's fence
refuses the stale daemon's writes, but the worker has no database connection. So the daemon
hands each worker its attempt's identity (``GPUSPOOL_FENCE``, the claim's fencing token, and
``GPUSPOOL_HOST``; see :mod:`gpuspool.protocol`), and the worker keeps ``OUT.partial.owner``:

- at start, under the file's lock, it writes its job id and token there, unless the file
  already names a newer attempt of the same job (tokens only grow: each claim of a job takes
  the next). A file naming another job is a finished or abandoned job's leftover (intake lets
  no two live jobs share an output), and is taken over;
- before every write to the output's files (append, checkpoint, cutting back on resume, the
  final rename), under the same lock, it checks that the file still names its own token; while
  it holds the lock nobody else takes over, so the check and the write are one step.

The lock is ``lockf`` (POSIX record locks), which NFS carries through its lock manager; taking
it also makes the NFS client read the file afresh. A worker that finds another token stops
writing at once (:class:`Fenced`). A lock held too long (a frozen worker holds it) is waited
for at most ``wait_s`` (:class:`LockTimeout`), so a stale worker can never block the new owner.

The file lives in the submitter's folder and only the submitter's own workers read it: a user
who edits it can only stop their own job. The daemon (root) never opens it. It is mode 0600
whatever the job's umask: a record lock needs only a descriptor, so another user who could open
it for reading could hold a shared lock on it for ever, and every write of the job would wait
for it and give up (exit 74) until the job failed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from gpuspool.protocol import FENCE_ENV, HOST_ENV, owner_path

#: Longest owner file read; a longer one is not a valid owner record.
MAX_OWNER_BYTES = 4096
#: Pause between tries of a lock another process holds.
_LOCK_POLL_S = 0.02
#: The job's id, which the daemon puts in every job's environment (``runner.JOB_ID_ENV``; not
#: imported from there: the worker imports nothing of the daemon's process handling).
JOB_ID_ENV = "GPUSPOOL_JOB_ID"


class Fenced(Exception):
    """Another attempt owns the output: this one must not write another byte of it."""


class LockTimeout(Exception):
    """The owner file stayed locked for longer than the bounded wait."""


@dataclass(frozen=True, slots=True)
class Attempt:
    """This worker's attempt: its job, the claim's fencing token and the host that claimed it."""

    job: str
    fence: int
    host: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Attempt | None:
        """The attempt the daemon announced, None when it announced none (one host, or a run
        by hand). A malformed value raises ``ValueError``: the daemon never writes one."""
        raw = environ.get(FENCE_ENV)
        if raw is None:
            return None
        if not raw.isdigit() or len(raw) > 18:
            raise ValueError(f"{FENCE_ENV} must be a fencing token (a whole number), not {raw!r}")
        host = environ.get(HOST_ENV, "")[:253] or "unnamed host"
        return cls(environ.get(JOB_ID_ENV, "")[:64], int(raw), host)

    def describe(self) -> str:
        return f"attempt {self.fence} on {self.host}"


def read_owner(data: bytes) -> Attempt | None:
    """The attempt an owner file names, None if it names none (empty, cut short, edited)."""
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError):  # 4 KiB of "[" nests deeper than the decoder goes
        return None
    if not isinstance(raw, dict):
        return None
    job, fence, host = raw.get("job"), raw.get("fence"), raw.get("host")
    if type(fence) is not int or fence < 0 or not isinstance(host, str):
        return None
    if not isinstance(job, str):
        return None
    return Attempt(job[:64], fence, host[:253])


class OwnerFile:
    """The owner file of one output, held open (and checked) for the whole run."""

    def __init__(self, out: Path, attempt: Attempt, wait_s: float):
        self.path = owner_path(out)
        self.attempt = attempt
        self.wait_s = wait_s
        self._fd: int | None = None
        self._lost: str | None = None

    # -- the two steps -------------------------------------------------------------------------
    def take(self) -> None:
        """Make this attempt the output's owner, unless a newer attempt already is (``Fenced``).

        Nothing of the output is touched here; the caller cuts its files back to the checkpoint
        (resume) under :meth:`guard`, after this."""
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        self._fd = os.open(self.path, flags, 0o600)
        st = os.fstat(self._fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(self.path))
        if st.st_mode & 0o077 and st.st_uid == os.geteuid():
            os.fchmod(self._fd, 0o600)  # left open to others (an earlier version made it 0644)
        with self._locked():
            current = self._read()
            mine = self.attempt
            if current is not None and current.job == mine.job and current.fence > mine.fence:
                self._lose(current)
            record = {"job": mine.job, "fence": mine.fence, "host": mine.host, "pid": os.getpid()}
            data = (json.dumps(record) + "\n").encode()
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
            os.fsync(self._fd)

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Hold the lock while the body writes, after checking this attempt still owns the
        output; ``Fenced`` (and nothing written) if it does not."""
        if self._lost is not None:
            raise Fenced(self._lost)
        with self._locked():
            self._check()
            yield

    def remove(self) -> None:
        """Remove the owner file once the output is complete (call inside :meth:`guard`): a
        stale attempt that checks later finds it gone, which is not its own."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- internals -----------------------------------------------------------------------------
    def _check(self) -> None:
        assert self._fd is not None
        try:
            here = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            here = None
        mine = os.fstat(self._fd)
        if here is None or (here.st_dev, here.st_ino) != (mine.st_dev, mine.st_ino):
            self._lost = (
                f"{self.path} was removed or replaced (the output was finished or taken over by "
                f"another attempt); {self.attempt.describe()} writes nothing more"
            )
            raise Fenced(self._lost)
        current = self._read()
        if current != self.attempt:
            self._lose(current)

    def _lose(self, current: Attempt | None) -> None:
        who = current.describe() if current is not None else "no valid attempt"
        self._lost = (
            f"fenced out: {self.path} names {who}; {self.attempt.describe()} no longer owns "
            "the output and writes nothing more"
        )
        raise Fenced(self._lost)

    def _read(self) -> Attempt | None:
        assert self._fd is not None
        return read_owner(os.pread(self._fd, MAX_OWNER_BYTES + 1, 0)[:MAX_OWNER_BYTES])

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """``lockf`` the whole file, trying for at most ``wait_s`` (a frozen process may hold
        it forever)."""
        assert self._fd is not None
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
            if time.monotonic() >= deadline:
                raise LockTimeout(
                    f"{self.path} stayed locked for over {self.wait_s:g} s (a stale worker of "
                    "this job, frozen while it wrote, holds it); try again later"
                )
            time.sleep(_LOCK_POLL_S)
        try:
            yield
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)


__all__ = ["Attempt", "Fenced", "LockTimeout", "OwnerFile", "read_owner"]
