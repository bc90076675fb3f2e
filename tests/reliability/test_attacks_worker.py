"""Issue 10, rows 1, 2, 4 and 14: what a submitter's job can do to the root daemon that runs it.

Each test runs the real daemon (``gpuspool daemon``, root) and a real unprivileged submitter
(``gpuspool-test``, a system user without a home); the job is the stand-in worker
(tests/stub_worker.py) run by the system Python in a folder every user can reach.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import STUB_WORKER, gpu_entry, wait_until
from tests.integration.conftest import LiveDaemon, ensure_test_user, wait_state

SYSTEM_PYTHON = "/usr/bin/python3"
VICTIM = "gpuspool-victim"
#: Every variable a job's process may be started with (``/proc/self/environ``): the config's
#: job_env adds STUB_MODE here, and a prestarted one has its gate (``prestart``, on by default).
ALLOWED_ENV = {"PATH", "LANG", "HOME", "USER", "LOGNAME", "CUDA_VISIBLE_DEVICES",
               "CUDA_DEVICE_ORDER", "PYTHONUNBUFFERED", "GPUSPOOL_JOB_ID", "GPUSPOOL_EVENTS_FD",
               "TMPDIR", "XDG_CACHE_HOME", "NUMBA_CACHE_DIR", "STUB_MODE",
               "GPUSPOOL_GATE_FD"}  # fmt: skip

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root"),
    pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason=f"no {SYSTEM_PYTHON}"),
]


def ensure_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", name], check=True)  # fmt: skip
        return pwd.getpwnam(name)


class Site:
    """A live daemon whose jobs run as ``gpuspool-test``, over files every user can reach."""

    def __init__(self, top: Path, user: pwd.struct_passwd, mode: str, env: dict[str, str]):
        self.top, self.user = top, user
        stub = top / "stub_worker.py"
        shutil.copy(STUB_WORKER, stub)
        stub.chmod(0o755)
        self.home = top / "submitter"  # the submitter's own folder: they may swap what is in it
        self.home.mkdir(mode=0o755)
        os.chown(self.home, user.pw_uid, user.pw_gid)
        self.out = self.home / "out"
        self.out.mkdir(mode=0o755)
        os.chown(self.out, user.pw_uid, user.pw_gid)
        self.input = top / "in.jsonl"
        self.input.write_text('{"audio": "a.wav"}\n')
        self.input.chmod(0o644)
        self.daemon = LiveDaemon(
            top,
            worker_command=[SYSTEM_PYTHON, str(stub)],
            scratch_dir=str(top / "scratch"),
            allow_root_jobs=False,
            worker_extra_args=[],
        )
        self.daemon.start(env={**os.environ, **env, "GPUSPOOL_JOB_ENV": json.dumps(
            {"STUB_MODE": mode})})  # fmt: skip

    def drop(self, stem: str, **fields: Any) -> Path:
        """A job file written by the submitter (owned by them, 0644) into incoming/."""
        body = {"input": str(self.input), "output": str(self.out / f"{stem}.jsonl"),
                "tokenizer": "tiny", "name": stem, **fields}  # fmt: skip
        staging = self.daemon.spool.staging
        path = staging / f"{stem}.json"
        path.write_text(json.dumps(body))
        path.chmod(0o644)
        os.chown(path, self.user.pw_uid, self.user.pw_gid)
        os.rename(path, self.daemon.spool.incoming / path.name)
        return self.daemon.spool.incoming / path.name

    def accepted(self, name: str) -> str:
        """The id of the accepted job called ``name``."""

        def find() -> str | None:
            for line in self.daemon.log_path.read_text().splitlines():
                if '"job_accepted"' in line and f'"name": "{name}"' in line:
                    return str(json.loads(line)["job_id"])
            return None

        return str(wait_until(find, 30))

    def job_log(self, job_id: str) -> Path:
        return self.top / "state" / "logs" / f"{job_id}.log"

    def probe(self, job_id: str) -> dict[str, Any]:
        """What the job said it could see (its ``probe`` line in its human log)."""

        def find() -> dict[str, Any] | None:
            path = self.job_log(job_id)
            for line in path.read_text().splitlines() if path.exists() else ():
                if line.startswith('{"probe"'):
                    return dict(json.loads(line)["probe"])
            return None

        return dict(wait_until(find, 60))

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gpuspool.cli", "--config", str(self.daemon.config), *args],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip


@pytest.fixture(scope="module")
def user() -> pwd.struct_passwd:
    return ensure_test_user()


@pytest.fixture
def top() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="gpuspool-attack-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_site(top: Path, user: pwd.struct_passwd) -> Iterator[Any]:
    sites: list[Site] = []

    def make(mode: str, env: dict[str, str] | None = None) -> Site:
        sites.append(Site(top, user, mode, env or {}))
        return sites[-1]

    yield make
    for site in sites:
        proc = site.daemon.proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


def test_row1_swapped_output_folder_is_not_entered_as_root(make_site: Any) -> None:
    """Row 1: after acceptance the submitter swaps their output folder for a symbolic link into
    another user's 0700 folder. The worker starts in / (the folder it is in before it drops
    root) and cannot read that user's file, neither through its cwd nor through the link."""
    victim = ensure_user(VICTIM)
    site = make_site("probe")
    site.drop("swap")
    job = site.accepted("swap")
    private = site.top / "victim" / "private"
    private.mkdir(parents=True)
    for d in (private.parent, private):
        os.chown(d, victim.pw_uid, victim.pw_gid)
    private.chmod(0o700)  # the only thing that protects the file below
    secret = private / "secret.txt"
    secret.write_text("the victim's secret\n")
    secret.chmod(0o644)
    os.chown(secret, victim.pw_uid, victim.pw_gid)
    assert wait_state(site.daemon, job, {"queued"}, 30) == "queued"
    site.out.rename(site.home / "out.orig")
    site.out.symlink_to(private)
    site.daemon.set_gpus(gpu_entry(0, 50))
    seen = site.probe(job)
    assert seen["uid"] == site.user.pw_uid
    assert seen["cwd"] == "/"
    for way in ("secret_via_cwd", "secret_via_proc_cwd", "secret_via_output_folder"):
        assert seen[way].startswith("error:"), (way, seen[way])
    assert "victim's secret" not in site.job_log(job).read_text()
    assert site.daemon.stop() == 0


def test_row1_daemon_is_no_oracle_for_files_behind_a_swapped_folder(make_site: Any) -> None:
    """Row 1, the daemon's side: a job that exits 0 without writing, its output folder swapped
    for a link to another user's private folder that holds a file of the output's name. The
    daemon looks for the output as the job's user, so it is not "done" (which would tell the
    submitter that the other user's file exists)."""
    victim = ensure_user(VICTIM)
    site = make_site("lie")
    site.drop("oracle", max_attempts=1)
    job = site.accepted("oracle")
    private = site.top / "victim2"
    private.mkdir(mode=0o700)
    os.chown(private, victim.pw_uid, victim.pw_gid)
    (private / "oracle.jsonl").write_text("{}\n")
    assert wait_state(site.daemon, job, {"queued"}, 30) == "queued"
    site.out.rename(site.home / "out.orig")
    site.out.symlink_to(private)
    site.daemon.set_gpus(gpu_entry(0, 50))
    assert wait_state(site.daemon, job, {"done", "failed"}, 60) == "failed"
    assert "worker crashed" in site.daemon.job(job).reason
    assert site.daemon.stop() == 0


def test_row14_job_environment_is_an_allow_list(make_site: Any) -> None:
    """Row 14: the daemon's environment (the webhook URL and its token, anything else) never
    reaches a job; the job (a user without a home) gets a private writable TMPDIR and caches,
    removed when it is done."""
    secret = "token-s3cret-4711"
    site = make_site("probe", {"GPUSPOOL_WEBHOOK_URL": f"http://127.0.0.1:9/hook?{secret}",
                               "DAEMON_ONLY_SECRET": secret})  # fmt: skip
    assert not Path(site.user.pw_dir).exists()  # the submitter has no home
    site.drop("env")
    job = site.accepted("env")
    site.daemon.set_gpus(gpu_entry(0, 50))
    seen = site.probe(job)
    environ = seen["environ"]
    assert set(environ) <= ALLOWED_ENV, set(environ) - ALLOWED_ENV
    assert not any(secret in v for v in environ.values())
    assert environ["GPUSPOOL_JOB_ID"] == job and environ["USER"] == site.user.pw_name
    assert environ["STUB_MODE"] == "probe"  # the configured job_env
    scratch = site.top / "scratch" / job
    assert environ["TMPDIR"] == str(scratch)
    assert seen["home_writable"] is False
    assert seen["tmp_writable"] and seen["numba_cache_writable"] and seen["cache_writable"]
    assert wait_state(site.daemon, job, {"done", "failed"}, 60) == "done"
    # Removed in the tick that files the job as done, just after the ledger says so: another
    # process reading the ledger may see "done" a moment before the folder is gone.
    wait_until(lambda: not scratch.exists(), 10, 0.05)
    assert site.daemon.stop() == 0


@pytest.mark.parametrize(("field", "value"), [("tokenizer", "tiny\x00x"), ("tokenizer", "a\nb"),
                                              ("name", "x\x1b[2J")])  # fmt: skip
def test_row2_row4_control_characters_are_refused_and_others_still_run(
    make_site: Any, field: str, value: str
) -> None:
    """Rows 2 and 4: a NUL byte or a newline in a string that becomes an argument is refused at
    intake with the field named; the daemon keeps ticking and the next job runs to done."""
    site = make_site("ok")
    site.drop("bad", **{field: value})
    site.drop("good")
    site.daemon.set_gpus(gpu_entry(0, 50))
    good = site.accepted("good")
    reason = wait_until(lambda: [p.read_text() for p in site.daemon.spool.reason_files()], 30)
    assert f"{field}:" in reason[0] and "control characters" in reason[0]
    assert wait_state(site.daemon, good, {"done", "failed"}, 60) == "done"
    assert "tick_failed" not in site.daemon.log_path.read_text()
    assert site.daemon.stop() == 0


def test_row4_hostile_events_crash_neither_daemon_nor_startup_nor_cli(make_site: Any) -> None:
    """Row 4: a job writes wrong types, 2,000 nested brackets and endless lines to its events
    channel and its log. The daemon keeps its valid progress; ``status``, ``status --json``,
    ``show`` and ``logs`` work; after a daemon crash, with the job's process gone and junk last in
    its events file, start-up files the job (interrupted) and the daemon runs on."""
    site = make_site("hostile")
    site.drop("hostile")
    job = site.accepted("hostile")
    site.daemon.set_gpus(gpu_entry(0, 50))
    wait_until(lambda: (site.daemon.job(job).progress or {}).get("lines_done") == 2, 60)
    for args in (["status"], ["status", "--json"], ["show", job], ["logs", job]):
        got = site.cli(*args)
        assert got.returncode == 0, (args, got.stderr[-2000:])
    assert json.loads(site.cli("status", "--json").stdout)["jobs"][0]["progress"]["lines_done"] == 2
    pid = site.daemon.job(job).pid
    site.daemon.kill9()
    os.killpg(pid, signal.SIGKILL)
    events = site.top / "state" / "events" / f"{job}.events"
    with open(events, "ab") as f:
        f.write(b'{"event":"error","exit_code":"x"}\n' + b"{" + b"[" * 5000 + b"\n")
    site.daemon.start(env={**os.environ, "GPUSPOOL_JOB_ENV": json.dumps({"STUB_MODE": "ok"})})
    assert wait_state(site.daemon, job, {"interrupted", "running", "done"}, 30)
    assert wait_state(site.daemon, job, {"done", "failed"}, 60) == "done"
    assert site.cli("status").returncode == 0
    assert "tick_failed" not in site.daemon.log_path.read_text()
    assert site.daemon.stop() == 0
