"""Two real workers on one output (a shared ledger's stale attempt and its successor).

The first worker (attempt 1 on host a) is frozen mid-run with SIGSTOP, a second (attempt 2 on
host b, the newer fencing token) resumes the output, and the first is woken with SIGCONT: it
must append no line and rename nothing, and exit 77 with an ``error`` event saying why; the
output is byte-identical to an uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from tests.extract.conftest import CHECKPOINTED_ARGS as ARGS
from tests.extract.conftest import spawn_extract

from gpuspool.exitcodes import ExitCode
from gpuspool.extract.owner import JOB_ID_ENV
from gpuspool.protocol import FENCE_ENV, HOST_ENV, owner_path, parse_event, partial_path

pytest.importorskip("torch")
pytest.importorskip("qwen_tts")


def _start(args: list[Any], fence: int, host: str) -> subprocess.Popen[str]:
    """A worker as the daemon starts it on a shared ledger: its own session, the attempt in
    its environment."""
    attempt = {FENCE_ENV: str(fence), HOST_ENV: host, JOB_ID_ENV: "job-1"}
    return spawn_extract(*args, env=attempt, start_new_session=True)


def _ckpt(out: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(Path(str(out) + ".partial.ckpt").read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _wait_for(proc: subprocess.Popen[str], out: Path, lines: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ck = _ckpt(out)
        if ck is not None and ck["next_line"] >= lines and not ck["complete"]:
            return
        assert proc.poll() is None, f"worker ended (rc={proc.returncode}) before line {lines}"
        time.sleep(0.002)
    raise AssertionError(f"no checkpoint past line {lines} within {timeout} s")


def _lock_is_free(out: Path) -> bool:
    fd = os.open(owner_path(out), os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        assert exc.errno in (errno.EACCES, errno.EAGAIN)
        return False
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


def _freeze(proc: subprocess.Popen[str], out: Path) -> None:
    """SIGSTOP the worker's whole group, at a moment it does not hold the owner file's lock
    (a worker frozen inside a write is the bounded wait's case, tested on its own)."""
    for _ in range(200):
        os.killpg(proc.pid, signal.SIGSTOP)
        time.sleep(0.05)
        if _lock_is_free(out):
            return
        os.killpg(proc.pid, signal.SIGCONT)
        time.sleep(0.001)
    raise AssertionError("the worker held the owner file's lock at every try")


def _events(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in stdout.splitlines() if x.strip()]


@pytest.mark.parametrize("wake", ["mid-run", "after-finish"])
def test_a_stale_worker_woken_writes_nothing(
    many_clips: Path, tiny_tokenizer: Path, tmp_path: Path, uninterrupted: bytes, wake: str
) -> None:
    out = tmp_path / "out.jsonl"
    args = ["--input", many_clips, "--output", out, "--tokenizer", tiny_tokenizer, *ARGS]
    stale = _start(args, 1, "a")
    new: subprocess.Popen[str] | None = None
    try:
        _wait_for(stale, out, 6)
        _freeze(stale, out)
        frozen_at = _ckpt(out)
        assert frozen_at is not None
        partial_inode = partial_path(out).stat().st_ino

        new = _start(args, 2, "b")
        if wake == "mid-run":
            # The new owner resumes and writes past the stale worker's last line; it is frozen
            # there in turn, and the stale worker is woken while the output is the new one's.
            _wait_for(new, out, frozen_at["next_line"] + 6)
            _freeze(new, out)
            os.killpg(stale.pid, signal.SIGCONT)
            stale_out, _ = stale.communicate(timeout=120)
            assert _ckpt(out) is not None and not out.exists()
            os.killpg(new.pid, signal.SIGCONT)
            new_out, _ = new.communicate(timeout=120)
        else:
            new_out, _ = new.communicate(timeout=120)
            assert new.returncode == 0
            # The stale worker's open OUT.partial is the file the new owner renamed to OUT.
            assert out.stat().st_ino == partial_inode
            os.killpg(stale.pid, signal.SIGCONT)
            stale_out, _ = stale.communicate(timeout=120)
    finally:
        for p in (stale, new):
            if p is not None and p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    assert stale.returncode == ExitCode.FENCED_OUT
    last = _events(stale_out)[-1]
    assert last["event"] == "error" and last["exit_code"] == ExitCode.FENCED_OUT
    assert "attempt 1 on a no longer owns the output" in last["reason"] or (
        "removed or replaced" in last["reason"]
    )
    # It wrote no line after it was frozen: its own count never moved past its checkpoint.
    assert last["lines_done"] == frozen_at["lines_done"]
    # The daemon reads this event on its channel: it is a valid one.
    assert parse_event(json.dumps(last)) is not None
    assert not any(e["event"] == "summary" for e in _events(stale_out))

    assert new.returncode == 0
    start = next(e for e in _events(new_out) if e["event"] == "start")
    assert start["resumed"] is True and start["resume_line"] >= frozen_at["next_line"]
    assert out.read_bytes() == uninterrupted
    for side in ("", ".ckpt", ".pending", ".owner"):
        assert not Path(f"{out}.partial{side}").exists(), side


def test_a_frozen_writer_holding_the_lock_delays_the_new_owner_only_so_long(
    many_clips: Path, tiny_tokenizer: Path, tmp_path: Path
) -> None:
    """The new owner waits at most --fence-lock-wait-s for the lock a frozen stale worker holds,
    then exits 74 (retryable) with the reason, having written nothing."""
    out = tmp_path / "out.jsonl"
    args = ["--input", many_clips, "--output", out, "--tokenizer", tiny_tokenizer, *ARGS]
    stale = _start(args, 1, "a")
    holder: subprocess.Popen[str] | None = None
    try:
        _wait_for(stale, out, 6)
        os.killpg(stale.pid, signal.SIGSTOP)
        time.sleep(0.05)
        if _lock_is_free(out):
            # Hold the lock as a worker frozen inside a write would (a process of its own);
            # else the stale worker was frozen inside a write, holding it itself.
            holder = subprocess.Popen(
                [sys.executable, "-c", "import fcntl, os, sys, time\n"
                 f"fd = os.open({str(owner_path(out))!r}, os.O_RDWR)\n"
                 "fcntl.lockf(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\n"
                 "time.sleep(120)\n"],
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert not _lock_is_free(out)
        before = (partial_path(out).read_bytes(), owner_path(out).read_bytes())
        t0 = time.monotonic()
        new = _start([*args, "--fence-lock-wait-s", "1"], 2, "b")
        new_out, _ = new.communicate(timeout=120)
        waited = time.monotonic() - t0
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(stale.pid, signal.SIGKILL)
        stale.wait()
    assert new.returncode == ExitCode.OUTPUT_LOCKED
    last = _events(new_out)[-1]
    assert last["exit_code"] == ExitCode.OUTPUT_LOCKED
    assert "stayed locked for over 1 s" in last["reason"]
    assert 1 <= waited < 60
    assert (partial_path(out).read_bytes(), owner_path(out).read_bytes()) == before
