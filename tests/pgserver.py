"""A throwaway PostgreSQL server for the test session, and a fresh database for each test.

The server is the real one Debian packages (``scripts/test`` installs it): ``initdb`` into a
temporary folder, ``pg_ctl start`` on a free port, listening on 127.0.0.1 and on a socket in that
folder only. PostgreSQL refuses to run as root, so as root it runs as the ``postgres`` system
user the package creates (or a test user made for it). Each test gets its own database, created
from an empty template. In CI (``CI`` set) a server that cannot start fails the tests with the
reason; elsewhere, a machine without the server binaries or the driver skips them, saying why.

Use from a conftest: ``from tests.pgserver import pg_server, pg_url  # noqa: F401``.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

SUPERUSER = "gpuspool"
TEMPLATE = "gpuspool_template"


def _unavailable(reason: str) -> None:
    """Fail in CI (the server must be there); skip with the reason elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL tests cannot run: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL tests need {reason}", allow_module_level=True)


def require_driver() -> None:
    """Call at the top of a test module that imports ``psycopg`` or ``gpuspool.ledger_pg``:
    without the driver its tests fail in CI and are skipped, with the reason, elsewhere."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("the psycopg driver (pip install -e '.[dev]')")


def find_bindir() -> Path | None:
    """Where ``initdb``/``pg_ctl`` live: $GPUSPOOL_TEST_PG_BIN, Debian's newest, else PATH."""
    if env := os.environ.get("GPUSPOOL_TEST_PG_BIN"):
        return Path(env)
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if versions:
        return Path(versions[-1]).parent
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """One ``postgres`` process in a temporary folder, owned by an unprivileged user."""

    def __init__(self, bindir: Path, run_as: str | None) -> None:
        self.bindir = bindir
        self.run_as = run_as
        self.root = Path(tempfile.mkdtemp(prefix="gpuspool-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = 0
        self._opts = ""
        self._names = itertools.count(1)
        if run_as is not None:
            pw = pwd.getpwnam(run_as)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self.root.chmod(0o700)

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, Any] = {}
        if self.run_as is not None:
            kwargs = {"user": self.run_as, "group": pwd.getpwnam(self.run_as).pw_gid,
                      "extra_groups": []}  # fmt: skip
        env = {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C", "HOME": str(self.root)}
        proc = subprocess.run(
            [str(self.bindir / argv[0]), *argv[1:]],
            cwd=self.root,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            **kwargs,
        )
        if check and proc.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{argv[0]} exited {proc.returncode}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
                f"{log}"
            )
        return proc

    def start(self) -> None:
        """``initdb`` once, then start on a free port (retried if another process took it)."""
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8",
                  "--no-locale", "--no-sync")  # fmt: skip
        last: Exception | None = None
        for _ in range(3):
            self.port = _free_port()
            opts = (
                f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root}"
                " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
                " -c max_connections=200"
            )
            try:
                self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                          "-o", opts, "start")  # fmt: skip
                self._opts = opts
                break
            except RuntimeError as exc:
                last = exc
        else:
            raise RuntimeError(f"PostgreSQL did not start: {last}")
        self.admin(f"CREATE DATABASE {TEMPLATE} TEMPLATE template0")

    def restart(self) -> None:
        """Restart the server (fast: every client's connection is cut), same port and options."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-m", "fast", "-w",
                  "-t", "60", "restart")  # fmt: skip

    def down(self) -> None:
        """Stop the server for a while (an outage): clients' connections are cut, and new ones
        refused until :meth:`up`. The data stays."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def up(self) -> None:
        """Start the server again after :meth:`down`, on the same port with the same options."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                  "-o", self._opts, "start")  # fmt: skip

    def stop(self) -> None:
        """Stop the server (fast: disconnect clients) and remove its folder."""
        if self.port:
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def admin(self, sql: str) -> None:
        """Run one statement outside a transaction (CREATE/DROP DATABASE) as the superuser."""
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(sql.encode())

    def create_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        name = f"test_{os.getpid()}_{next(self._names)}"
        self.admin(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE} STRATEGY FILE_COPY")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        self.admin(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")


def _server_user() -> str | None:
    """None when not root; else the package's ``postgres`` user, or a test user made for it."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
        return "postgres"
    except KeyError:
        from tests.integration.conftest import ensure_test_user

        return ensure_test_user().pw_name


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """The session's PostgreSQL server (started on first use, stopped at the end)."""
    require_driver()
    bindir = find_bindir()
    if bindir is None or not (bindir / "pg_ctl").exists():
        _unavailable("the PostgreSQL server binaries (apt-get install postgresql)")
    assert bindir is not None
    server = PgServer(bindir, _server_user())
    try:
        server.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        server.stop()
        pytest.fail(f"the test PostgreSQL server did not start: {exc}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """The URL of a fresh, empty database on the session's server, dropped after the test."""
    url = pg_server.create_database()
    yield url
    pg_server.drop_database(url)
