"""A review of the issue-10 design by two unprivileged submitters, against the real daemon.

Each test plays a hole found in the new design (the scanner that runs as the submitter, the
worker launch, what submitters see) with real users (``gpuspool-test``, ``gpuspool-test2``),
the documented folder modes and the stand-in worker, and asserts the behaviour that closes it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import STUB_WORKER, gpu_entry, wait_until
from tests.integration.conftest import TEST_USER, LiveDaemon, wait_state
from tests.reliability.submitters import (
    SECOND_USER,
    SYSTEM_PYTHON,
    Submitter,
    _ensure_user,
    _lay_out,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates users and runs as them"),
    pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason=f"no {SYSTEM_PYTHON}"),
]

#: Run as the attacker: SIGSTOP every scanner of the daemon (pid argv[2]) it may signal (its
#: own, once they run as it). Only that daemon's: other test runs may use the same users.
STOP_SCANNERS = """
import os, signal, sys, time
end, daemon = time.time() + float(sys.argv[1]), sys.argv[2]
while time.time() < end:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[1].decode() == daemon:
                    os.kill(int(pid), signal.SIGSTOP)
        except (OSError, IndexError):
            pass
    time.sleep(0.002)
"""


@pytest.fixture
def world() -> Iterator[Path]:
    top = Path(tempfile.mkdtemp(prefix="gpuspool-review-", dir="/tmp"))
    top.chmod(0o755)
    yield top
    subprocess.run(["rm", "-rf", "--", str(top)], check=False)  # trees deeper than rmtree goes


@pytest.fixture
def pair(world: Path) -> tuple[Submitter, Submitter]:
    """Two submitters: the attacker (``gpuspool-test``) and another user."""
    return Submitter(_ensure_user(TEST_USER), world), Submitter(_ensure_user(SECOND_USER), world)


@pytest.fixture
def make_daemon(world: Path) -> Iterator[Any]:
    made: list[LiveDaemon] = []

    def make(**config: Any) -> LiveDaemon:
        stub = world / "stub_worker.py"
        shutil.copy(STUB_WORKER, stub)
        stub.chmod(0o755)
        config.setdefault("worker_command", [SYSTEM_PYTHON, str(stub)])
        d = LiveDaemon(world, worker_extra_args=[], allow_root_jobs=False, **config)
        _lay_out(d)
        d.set_gpus(gpu_entry(0, 50))
        made.append(d)
        return d

    yield make
    for d in made:
        if d.proc is not None and d.proc.poll() is None:
            for child in psutil.Process(d.proc.pid).children(recursive=True):
                child.kill()  # scanners left stopped by a failed test
            d.proc.kill()
            d.proc.wait()


def drop(d: LiveDaemon, who: Submitter, stem: str, **fields: Any) -> None:
    """A job file written by ``who`` (theirs, 0644), renamed into incoming/."""
    body = {"input": str(who.data / "in.jsonl"), "output": str(who.data / f"{stem}.jsonl"),
            "tokenizer": "Qwen/tiny", "name": stem, "min_free_gib": 20, **fields}  # fmt: skip
    path = d.spool.staging / f"{stem}.json"
    path.write_text(json.dumps(body))
    path.chmod(0o644)
    os.chown(path, who.uid, who.user.pw_gid)
    os.rename(path, d.spool.incoming / path.name)


def accepted_id(d: LiveDaemon, name: str) -> str | None:
    for event in d.events():
        if event.get("event") == "job_accepted" and event.get("name") == name:
            return str(event["job_id"])
    return None


def as_user(
    who: Submitter, code: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Run ``code`` (Python) as ``who`` in the background."""
    return subprocess.Popen(
        [SYSTEM_PYTHON, "-c", code, *args],
        user=who.uid,
        group=who.user.pw_gid,
        extra_groups=[],
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        cwd="/",
        start_new_session=True,
    )


def stopped_scanners(d: LiveDaemon, uid: int) -> list[int]:
    """The daemon's scanners that run as ``uid`` and are stopped."""
    assert d.proc is not None
    out = []
    for proc in psutil.Process(d.proc.pid).children():
        try:
            stopped = proc.status() == psutil.STATUS_STOPPED and proc.uids().real == uid
        except psutil.Error:
            continue
        if stopped and "gpuspool.scan" in " ".join(proc.cmdline()):
            out.append(proc.pid)
    return out


def test_stopped_scanners_of_one_user_do_not_hold_another_users_intake(
    make_daemon: Any, pair: tuple[Submitter, Submitter]
) -> None:
    """A scanner runs as its submitter, who may SIGSTOP it. The attacker drops four jobs with
    a long input and stops each of its scanners as soon as it runs as them: it may hold one
    scanner, never every slot, so the other user's job is accepted within seconds, not after
    ``scan_timeout_s``."""
    attacker, other = pair
    d = make_daemon(scan_concurrency=2, scan_batch=1, scan_timeout_s=60.0)
    slow = attacker.data / "slow.jsonl"
    slow.write_bytes(b'{"audio": "/nonexistent/clip.wav"}\n' * 200_000)
    os.chown(slow, attacker.uid, attacker.user.pw_gid)
    d.start()
    assert d.proc is not None
    stopper = as_user(attacker, STOP_SCANNERS, "120", str(d.proc.pid))
    try:
        for i in range(4):
            drop(d, attacker, f"hog{i}", input=str(slow))
        wait_until(lambda: stopped_scanners(d, attacker.uid), timeout=60, step=0.1)
        time.sleep(3)  # a few ticks: every free slot has been offered meanwhile
        assert len(stopped_scanners(d, attacker.uid)) == 1  # one scanner per user at a time
        t0 = time.monotonic()
        drop(d, other, "victim")
        job = wait_until(lambda: accepted_id(d, "victim"), timeout=20, step=0.1)
        assert time.monotonic() - t0 < 20
        assert wait_state(d, str(job), {"done", "failed"}, timeout=60) == "done"
    finally:
        stopper.kill()
        stopper.wait()
    assert d.stop() == 0


def test_a_submitters_endless_log_line_stalls_no_ones_logs_command(
    make_daemon: Any, pair: tuple[Submitter, Submitter]
) -> None:
    """The daemon hands a job's log to its submitter (owner, 0600), who may write anything
    into it: here a 4 GiB run of NUL bytes without a newline (sparse: nothing on disk). The
    operator's ``gpuspool logs ID`` (root) still prints the log in seconds, with bounded memory:
    the long line cut, the lines before it intact."""
    attacker, _ = pair
    d = make_daemon()
    d.start()
    drop(d, attacker, "mine")
    job = str(wait_until(lambda: accepted_id(d, "mine"), timeout=30))
    assert wait_state(d, job, {"done", "failed"}, timeout=60) == "done"
    log = Path(d.job(job).log_path)
    wait_until(lambda: log.stat().st_uid == attacker.uid, timeout=30)
    grow = as_user(attacker, "import os, sys; os.truncate(sys.argv[1], 4 << 30)", str(log))
    assert grow.wait(timeout=60) == 0
    t0 = time.monotonic()
    got = subprocess.run(
        [sys.executable, "-m", "gpuspool.cli", "--config", str(d.config), "logs", job, "--json"],
        capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    assert got.returncode == 0, got.stderr[-2000:]
    assert time.monotonic() - t0 < 60
    assert len(got.stdout) < 1 << 20
    events = [json.loads(line) for line in got.stdout.splitlines()]
    assert any(e.get("event") == "job_finished" for e in events)
    assert "cut" in json.dumps(events[-1])
    assert d.stop() == 0


def test_a_process_carrying_another_users_job_id_is_never_adopted_as_that_job(
    make_daemon: Any, pair: tuple[Submitter, Submitter]
) -> None:
    """Job ids are public (the anonymised status). The daemon is killed after it claimed the
    other user's job and before it started it; meanwhile the attacker runs a process whose
    environment says ``GPUSPOOL_JOB_ID=<that job>``. The restarted daemon must not adopt it
    as the job (it would stand for the job, hold its GPU and never run it): only a process of
    the job's own user may be the job's, and the job runs to done."""
    attacker, other = pair
    d = make_daemon()
    killpoint = Path(__file__).with_name("killpoint_daemon.py")
    with open(d.log_path, "ab") as log:
        crashing = subprocess.Popen(
            [sys.executable, str(killpoint), str(d.config), "place_after_claim"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    drop(d, other, "victim")
    crashing.wait(timeout=60)
    job = str(accepted_id(d, "victim"))
    assert d.state(job) == "running" and d.job(job).pid is None
    impostor = as_user(attacker, "import time; time.sleep(300)", env={"GPUSPOOL_JOB_ID": job})
    try:
        d.start()
        assert wait_state(d, job, {"done", "failed"}, timeout=60) == "done"
        adopted = [e for e in d.events() if e.get("event") == "job_adopted"]
        assert all(e.get("pid") != impostor.pid for e in adopted), adopted
        assert impostor.poll() is None  # the attacker's own process is left alone
    finally:
        impostor.kill()
        impostor.wait()
    assert d.stop() == 0


#: Run as the attacker: a chain of folders ``argv[2]`` deep inside the folder ``argv[1]``.
DEEP_TREE = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
for _ in range(int(sys.argv[2])):
    os.mkdir("d", dir_fd=fd)
    inner = os.open("d", os.O_RDONLY, dir_fd=fd)
    os.close(fd)
    fd = inner
"""


def test_a_scratch_folder_the_user_filled_is_removed_without_failing_a_tick(
    make_daemon: Any, pair: tuple[Submitter, Submitter]
) -> None:
    """A job's scratch folder is its user's (0700), reachable by its id while the job runs:
    the attacker fills it with a tree 3,000 folders deep. When the job ends the daemon removes
    the folder without a failed tick (no ``RecursionError`` on the tick's thread), and the tree
    is gone."""
    attacker, _ = pair
    d = make_daemon()
    d.start(env={**os.environ, "GPUSPOOL_JOB_ENV": json.dumps({"STUB_MODE": "sleep"})})
    drop(d, attacker, "deep")
    job = str(wait_until(lambda: accepted_id(d, "deep"), timeout=30))
    assert wait_state(d, job, {"running"}, timeout=60) == "running"
    scratch = d.tmp / "scratch"
    wait_until(lambda: (scratch / job).is_dir(), timeout=30)
    grow = as_user(attacker, DEEP_TREE, str(scratch / job), "3000")
    assert grow.wait(timeout=120) == 0
    cancel = subprocess.run(
        [sys.executable, "-m", "gpuspool.cli", "--config", str(d.config), "cancel", job],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert cancel.returncode == 0, cancel.stderr
    assert wait_state(d, job, {"cancelled"}, timeout=60) == "cancelled"
    wait_until(lambda: not os.listdir(scratch), timeout=60)
    assert "tick_failed" not in d.log_path.read_text()
    assert d.stop() == 0


def test_a_scratch_parent_another_user_made_first_fails_no_job(
    make_daemon: Any, pair: tuple[Submitter, Submitter]
) -> None:
    """The scratch folders' parent lives in a shared sticky folder (``/var/tmp/gpuspool`` by
    default). Where it does not exist yet, any user can make it first. The daemon must not
    fail every job for it (nor use it): it moves that folder aside and makes its own."""
    attacker, other = pair
    shared = attacker.data.parent / "vartmp"
    shared.mkdir()
    shared.chmod(0o1777)
    d = make_daemon(scratch_dir=str(shared / "gpuspool"))
    planted = as_user(
        attacker, "import os, sys; os.mkdir(sys.argv[1], 0o777)", str(shared / "gpuspool")
    )
    assert planted.wait(timeout=30) == 0
    assert (shared / "gpuspool").stat().st_uid == attacker.uid
    d.start()
    drop(d, other, "victim")
    job = str(wait_until(lambda: accepted_id(d, "victim"), timeout=30))
    assert wait_state(d, job, {"done", "failed"}, timeout=60) == "done", d.job(job).reason
    parent = (shared / "gpuspool").lstat()
    assert parent.st_uid == 0 and parent.st_mode & 0o777 == 0o711
    assert d.stop() == 0


#: Run as the attacker: SIGSTOP each new child of the daemon (pid argv[1]) other than its worker
#: (argv[2]) as soon as it runs as them, watching the pids the kernel hands out next.
STOP_NEW_CHILDREN = """
import os, signal, sys, time
daemon, worker, end = sys.argv[1], int(sys.argv[2]), time.time() + float(sys.argv[3])
me = os.getpid()
while time.time() < end:
    with open("/proc/loadavg") as f:
        top = int(f.read().split()[-1])
    for pid in range(top - 16, top + 1):
        if pid in (me, worker):
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[1].decode() != daemon:
                    continue
            os.kill(pid, signal.SIGSTOP)
        except (OSError, IndexError):
            pass
"""
#: A worker that starts the stand-in worker after argv[1] seconds (the attacker's setup time).
SLOW_WORKER = """
import os, sys, time
time.sleep(float(sys.argv[1]))
os.execv(sys.executable, [sys.executable, sys.argv[2], *sys.argv[3:]])
"""


def test_a_stopped_output_check_does_not_hold_the_tick(
    make_daemon: Any, pair: tuple[Submitter, Submitter], world: Path
) -> None:
    """When a job exits 0, the daemon checks its output as the job's user, in a short-lived
    process of that user, whom the user may SIGSTOP: between fork and exec (where ``Popen``
    waits for the exec, forever) or after. The tick waits for neither: the job is filed
    within a few seconds of its exit (not after the check's 10 s timeout, nor never)."""
    attacker, _ = pair
    slow = world / "slow_worker.py"
    slow.write_text(SLOW_WORKER)
    slow.chmod(0o755)
    d = make_daemon(worker_command=[SYSTEM_PYTHON, str(slow), "4", str(world / "stub_worker.py")])
    d.start()
    drop(d, attacker, "mine")
    job = str(wait_until(lambda: accepted_id(d, "mine"), timeout=30))
    pid = int(wait_until(lambda: d.job(job).pid, timeout=60))
    assert d.proc is not None
    stopper = as_user(attacker, STOP_NEW_CHILDREN, str(d.proc.pid), str(pid), "60")
    try:
        wait_until(lambda: not psutil.pid_exists(pid), timeout=60, step=0.01)
        exited = time.monotonic()
        assert wait_state(d, job, {"done", "failed"}, timeout=60) == "done"
        assert time.monotonic() - exited < 5
    finally:
        stopper.kill()
        stopper.wait()
    assert d.stop() == 0
