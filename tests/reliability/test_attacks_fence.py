"""The worker's own fence, tried by another user of the server (review of the owner file).

The owner file ``OUT.partial.owner`` sits in the submitter's output folder, which on a shared
server is often readable by everyone (a home or data folder, mode 0755). A POSIX record lock
needs only a descriptor: another user who could open the file for reading could hold a shared
lock on it for ever, and every write of the job would wait ``--fence-lock-wait-s`` and exit 74
until the job failed after ``max_attempts``. Real users, real processes and real locks.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpuspool.privileges import JOB_UMASK
from gpuspool.protocol import owner_path
from tests.integration.conftest import TEST_USER
from tests.reliability.submitters import SECOND_USER, SYSTEM_PYTHON, _ensure_user, _pythonpath

#: As the job's worker: take the output (attempt 1), then write under the lock (attempt 2, as
#: the next attempt of the job would), with a 2 s bounded wait.
_WORKER = """
import sys
from pathlib import Path
from gpuspool.extract.owner import Attempt, LockTimeout, OwnerFile
out = Path(sys.argv[1])
owner = OwnerFile(out, Attempt("j1", int(sys.argv[2]), "h"), 2.0)
try:
    owner.take()
    with owner.guard():
        pass
except LockTimeout as exc:
    print("timeout", exc)
    sys.exit(74)
print("wrote")
"""

#: As another user: open the owner file for reading and hold a shared lock on it.
_HOLDER = """
import fcntl, os, sys, time
try:
    fd = os.open(sys.argv[1], os.O_RDONLY | os.O_NONBLOCK)
    fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
except OSError as exc:
    print("refused", exc.errno, flush=True)
    sys.exit(0)
print("held", flush=True)
time.sleep(60)
"""


def _as(user: pwd.struct_passwd, code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [SYSTEM_PYTHON, "-c", code, *args],
        user=user.pw_uid,
        group=user.pw_gid,
        extra_groups=[],
        umask=JOB_UMASK,  # the umask the daemon starts jobs with
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": _pythonpath(), "LANG": "C.UTF-8"},
        cwd="/",
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture
def folder() -> Iterator[Path]:
    """The submitter's output folder, readable by every user (as a home folder often is)."""
    top = Path(tempfile.mkdtemp(prefix="gpuspool-fence-"))
    top.chmod(0o755)
    owner = _ensure_user(TEST_USER)
    data = top / "data"
    data.mkdir(mode=0o755)
    os.chown(data, owner.pw_uid, owner.pw_gid)
    yield data
    shutil.rmtree(top, ignore_errors=True)


def test_another_user_cannot_hold_the_owner_files_lock(folder: Path) -> None:
    owner, other = _ensure_user(TEST_USER), _ensure_user(SECOND_USER)
    out = folder / "out.jsonl"
    first = _as(owner, _WORKER, str(out), "1")
    assert first.communicate(timeout=60)[0].strip() == "wrote"
    mode = stat.S_IMODE(os.stat(owner_path(out)).st_mode)
    assert mode & 0o077 == 0, f"owner file mode {mode:o}: others may open it"
    holder = _as(other, _HOLDER, str(owner_path(out)))
    try:
        assert holder.stdout is not None
        said = holder.stdout.readline().strip()
        assert said.startswith("refused"), f"{SECOND_USER} {said} a lock on the owner file"
        second = _as(owner, _WORKER, str(out), "2")
        got = second.communicate(timeout=60)[0]
        assert second.returncode == 0 and got.strip() == "wrote", got
    finally:
        holder.kill()
        holder.wait()


def test_an_owner_file_left_open_to_others_is_narrowed(folder: Path) -> None:
    """A file an earlier version left 0644 is made 0600 when the next attempt takes it."""
    owner = _ensure_user(TEST_USER)
    out = folder / "out.jsonl"
    path = owner_path(out)
    path.write_text("")
    os.chown(path, owner.pw_uid, owner.pw_gid)
    path.chmod(0o644)
    worker = _as(owner, _WORKER, str(out), "1")
    assert worker.communicate(timeout=60)[0].strip() == "wrote"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
