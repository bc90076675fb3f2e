"""The owner file beside OUT.partial: who may write the output (torch-free, real files and locks).

A POSIX record lock belongs to a process, so the tests that need a second holder start one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gpuspool.extract.owner import (
    JOB_ID_ENV,
    Attempt,
    Fenced,
    LockTimeout,
    OwnerFile,
    read_owner,
)
from gpuspool.extract.writer import Entry, OrderedWriter
from gpuspool.protocol import FENCE_ENV, HOST_ENV, owner_path

FP = {"input": "x"}


def _owner(
    out: Path, fence: int, host: str = "a", wait_s: float = 2.0, job: str = "j1"
) -> OwnerFile:
    owner = OwnerFile(out, Attempt(job, fence, host), wait_s)
    owner.take()
    return owner


def test_take_records_the_attempt_and_the_guard_lets_it_write(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    owner = _owner(out, 3)
    assert read_owner(owner_path(out).read_bytes()) == Attempt("j1", 3, "a")
    with owner.guard():
        pass
    owner.close()


def test_a_newer_attempt_fences_the_older_out_for_good(tmp_path: Path) -> None:
    """The older attempt's next check fails, and every later one, without even reading."""
    out = tmp_path / "out.jsonl"
    old = _owner(out, 3, "a")
    new = _owner(out, 4, "b")
    ran = []
    with (
        pytest.raises(Fenced, match="names attempt 4 on b; attempt 3 on a no longer owns"),
        old.guard(),
    ):
        ran.append(1)
    assert not ran  # the body never runs
    owner_path(out).write_text(json.dumps({"job": "j1", "fence": 3, "host": "a"}))  # too late
    with pytest.raises(Fenced), old.guard():
        pass
    old.close()
    new.close()


def test_an_older_attempt_cannot_take_the_output_back(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    new = _owner(out, 9, "b")
    with pytest.raises(Fenced, match="names attempt 9 on b"):
        _owner(out, 8, "a")
    assert read_owner(owner_path(out).read_bytes()) == Attempt("j1", 9, "b")  # untouched
    with new.guard():
        pass
    new.close()


def test_another_jobs_leftover_is_taken_over(tmp_path: Path) -> None:
    """Tokens count a job's attempts: a failed earlier job's file (intake lets no two live jobs
    share an output) never fences a new job out, whatever its token."""
    out = tmp_path / "out.jsonl"
    _owner(out, 40, "b", job="old").close()
    new = _owner(out, 1, "a", job="new")
    assert read_owner(owner_path(out).read_bytes()) == Attempt("new", 1, "a")
    with new.guard():
        pass
    new.close()


def test_the_job_id_variable_is_the_runners() -> None:
    from gpuspool import runner

    assert runner.JOB_ID_ENV == JOB_ID_ENV


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{",
        b"[]",
        b'{"job": "j1", "fence": "9", "host": "b"}',
        b'{"fence": 9, "host": "b"}',
        b"\xff",
    ],
)
def test_a_spoilt_owner_file_is_taken_over_but_fences_its_holder(
    tmp_path: Path, content: bytes
) -> None:
    """A user's edit names no attempt: a new attempt takes the output, a running one stops."""
    out = tmp_path / "out.jsonl"
    running = _owner(out, 2)
    owner_path(out).write_bytes(content)
    with pytest.raises(Fenced, match="names no valid attempt"), running.guard():
        pass
    taker = _owner(out, 3)
    with taker.guard():
        pass
    running.close()
    taker.close()


def test_a_removed_or_replaced_owner_file_fences(tmp_path: Path) -> None:
    """The finishing attempt removes the file: a stale one's check finds it gone, or a new one."""
    out = tmp_path / "out.jsonl"
    gone = _owner(out, 1)
    owner_path(out).unlink()
    with pytest.raises(Fenced, match="removed or replaced"), gone.guard():
        pass
    replaced = _owner(out, 2)
    owner_path(out).unlink()
    owner_path(out).write_text(json.dumps({"job": "j1", "fence": 2, "host": "a"}))  # a new file
    with pytest.raises(Fenced, match="removed or replaced"), replaced.guard():
        pass
    gone.close()
    replaced.close()


def test_a_link_in_place_of_the_owner_file_is_not_followed(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    target = tmp_path / "elsewhere"
    owner_path(out).symlink_to(target)
    with pytest.raises(OSError):
        _owner(out, 1)
    assert not target.exists()


def _hold_lock(path: Path) -> subprocess.Popen[str]:
    """Another process that takes the owner file's lock and keeps it (a frozen stale worker)."""
    code = (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.lockf(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_a_lock_held_too_long_is_waited_for_only_so_long(tmp_path: Path) -> None:
    """Neither the take-over nor a check waits for ever on a holder that never lets go."""
    out = tmp_path / "out.jsonl"
    running = _owner(out, 1)
    holder = _hold_lock(owner_path(out))
    try:
        t0 = time.monotonic()
        with pytest.raises(LockTimeout, match=r"stayed locked for over 0\.5 s"):
            _owner(out, 2, wait_s=0.5)
        assert 0.5 <= time.monotonic() - t0 < 5
        running.wait_s = 0.3
        with pytest.raises(LockTimeout), running.guard():
            pass
    finally:
        holder.kill()
        holder.wait()
    assert read_owner(owner_path(out).read_bytes()) == Attempt("j1", 1, "a")
    with running.guard():  # the holder is gone: its lock with it
        pass
    running.close()


def test_a_take_over_waits_for_a_writer_that_holds_the_lock(tmp_path: Path) -> None:
    """A short hold (a batch being written) is waited for, then the new attempt takes over."""
    out = tmp_path / "out.jsonl"
    holder = _hold_lock(owner_path(out))
    release = threading.Timer(0.5, holder.kill)
    release.start()
    try:
        t0 = time.monotonic()
        _owner(out, 5, wait_s=10).close()
        assert 0.4 <= time.monotonic() - t0 < 8
    finally:
        release.cancel()
        holder.kill()
        holder.wait()
    assert read_owner(owner_path(out).read_bytes()) == Attempt("j1", 5, "a")


def test_a_fenced_writer_writes_nothing(tmp_path: Path) -> None:
    """The ordered writer's append, checkpoint and final rename all go through the guard."""
    out = tmp_path / "out.jsonl"
    report = Path(str(out) + ".skipped.jsonl")
    stale = _owner(out, 1)
    w = OrderedWriter(out, report, FP, guard=stale.guard)
    w.add([Entry(1, 10, "out", '{"a": 1}')])
    ckpt = Path(str(out) + ".partial.ckpt")
    before = (Path(str(out) + ".partial").read_bytes(), ckpt.read_bytes())
    assert before[0] == b'{"a": 1}\n'
    new = _owner(out, 2)
    with pytest.raises(Fenced):
        w.add([Entry(2, 20, "out", '{"a": 2}')])
    with pytest.raises(Fenced):
        w.finish(after=stale.remove)
    assert (Path(str(out) + ".partial").read_bytes(), ckpt.read_bytes()) == before
    assert not out.exists() and owner_path(out).exists()
    w.close()
    # The new owner resumes from the checkpoint and finishes; it removes the owner file.
    w2 = OrderedWriter(out, report, FP, guard=new.guard)
    w2.add([Entry(2, 20, "out", '{"a": 2}')])
    w2.finish(after=new.remove)
    assert out.read_bytes() == b'{"a": 1}\n{"a": 2}\n'
    assert not owner_path(out).exists()
    stale.close()
    new.close()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({FENCE_ENV: "12", HOST_ENV: "gpu-1", JOB_ID_ENV: "j1"}, Attempt("j1", 12, "gpu-1")),
        ({FENCE_ENV: "12"}, Attempt("", 12, "unnamed host")),
    ],
)
def test_the_attempt_from_the_environment(env: dict[str, str], expected: Attempt | None) -> None:
    assert Attempt.from_env(env) == expected


@pytest.mark.parametrize("raw", ["", "-1", "1e3", "x", "9" * 19])
def test_a_malformed_fence_is_an_error(raw: str) -> None:
    with pytest.raises(ValueError, match=FENCE_ENV):
        Attempt.from_env({FENCE_ENV: raw})


@pytest.mark.parametrize("junk", [b"[" * 4096, b'{"job": ' * 1000, b"\xff\xfe", b"1e999999"])
def test_an_owner_file_of_junk_names_no_attempt_and_is_taken_over(
    tmp_path: Path, junk: bytes
) -> None:
    """Its user (or anyone who may write the folder) may leave anything there: deep nesting
    that exhausts the JSON decoder's recursion included. The next attempt takes the output."""
    assert read_owner(junk) is None
    out = tmp_path / "out.jsonl"
    owner_path(out).write_bytes(junk)
    owner = _owner(out, 1)
    assert read_owner(owner_path(out).read_bytes()) == Attempt("j1", 1, "a")
    owner.close()
