"""Real unprivileged submitters for the attack tests: system users in the submitters' group,
running the real CLI with the system Python, and the spool laid out with the owners and modes
deploy/install.sh gives it."""

from __future__ import annotations

import grp
import json
import os
import pwd
import subprocess
import sys
from pathlib import Path

import gpuspool
from tests.integration.conftest import TEST_USER, LiveDaemon, ensure_test_user

SYSTEM_PYTHON = "/usr/bin/python3"
SUBMIT_GROUP = "gpuspool-submit"
SECOND_USER = "gpuspool-test2"


def _ensure_user(name: str) -> pwd.struct_passwd:
    """A system user in the submitters' group (both created if missing)."""
    if name == TEST_USER:
        ensure_test_user()
    elif subprocess.run(["id", name], capture_output=True).returncode != 0:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
        )
    if subprocess.run(["getent", "group", SUBMIT_GROUP], capture_output=True).returncode != 0:
        subprocess.run(["groupadd", "--system", SUBMIT_GROUP], check=True)
    subprocess.run(["usermod", "--append", "--groups", SUBMIT_GROUP, name], check=True)
    return pwd.getpwnam(name)


def _pythonpath() -> str:
    """This checkout's sources and the site-packages of this interpreter, for the system Python
    a submitter runs (this venv's interpreter may sit where they cannot reach it)."""
    src = str(Path(gpuspool.__file__).resolve().parents[1])
    return os.pathsep.join([src, *(p for p in sys.path if p.endswith("site-packages"))])


class Submitter:
    """A real unprivileged user running the real CLI."""

    def __init__(self, user: pwd.struct_passwd, world: Path) -> None:
        self.user = user
        self.name = user.pw_name
        self.uid = user.pw_uid
        self.data = world / f"data-{self.name}"
        self.data.mkdir(mode=0o755)
        (self.data / "in.jsonl").write_text('{"audio": "a.wav"}\n')
        for p in (self.data, self.data / "in.jsonl"):
            os.chown(p, user.pw_uid, user.pw_gid)

    def run(self, cfg: Path, *args: str, cli: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [SYSTEM_PYTHON, "-m", "gpuspool.cli", "--config", str(cfg), *args] if cli else [
            SYSTEM_PYTHON, "-c", args[0]]  # fmt: skip
        env = {"PATH": "/usr/bin:/bin", "HOME": "/", "LANG": "C.UTF-8", "COLUMNS": "200",
               "PYTHONPATH": _pythonpath()}  # fmt: skip
        return subprocess.run(
            argv,
            user=self.uid,
            group=self.user.pw_gid,
            extra_groups=os.getgrouplist(self.name, self.user.pw_gid),
            env=env,
            cwd="/",
            capture_output=True,
            text=True,
            timeout=120,
        )

    def submit(self, cfg: Path, name: str) -> str:
        done = self.run(cfg, "submit", "--input", str(self.data / "in.jsonl"), "--output",
                        str(self.data / f"{name}.jsonl"), "--tokenizer", "Qwen/tiny",
                        "--name", name, "--min-free-gib", "20", "--json")  # fmt: skip
        assert done.returncode == 0, done.stderr
        return str(json.loads(done.stdout)["job_id"])

    def can_read(self, path: Path) -> bool:
        code = f"open({str(path)!r}, 'rb').read()"
        return self.run(Path("/"), code, cli=False).returncode == 0


def _lay_out(live: LiveDaemon) -> None:
    """The spool and state folders with the owners and modes deploy/install.sh gives them."""
    submit_gid = grp.getgrnam(SUBMIT_GROUP).gr_gid
    spool = live.tmp / "spool"
    state = live.tmp / "state"
    for path, mode, gid in (
        (spool, 0o710, submit_gid),
        (spool / "incoming", 0o1730, submit_gid),
        (spool / "tmp", 0o1730, submit_gid),
        (spool / "accepted", 0o700, 0),
        (spool / "rejected", 0o711, 0),
        (state, 0o711, 0),
        (state / "logs", 0o711, 0),
    ):
        path.mkdir(exist_ok=True)
        os.chown(path, 0, gid)
        path.chmod(mode)
