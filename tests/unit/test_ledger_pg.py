"""The PostgreSQL ledger's own parts: the versioned schema, errors that say what to do, the
factory, and the daemon's tick running a job on a shared ledger."""
# ruff: noqa: E402 - the driver check runs before the imports that need the driver

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from tests.pgserver import require_driver

require_driver()

import psycopg
import pytest

from gpuspool.config import ConfigError, Settings, redact_url
from gpuspool.ledger import Ledger, LedgerError
from gpuspool.ledger_api import open_ledger
from gpuspool.ledger_pg import MIGRATIONS, SCHEMA_VERSION, PgLedger
from tests.conftest import Harness, gpu_entry


def test_schema_is_created_once_and_versioned(pg_url: str) -> None:
    """A fresh database migrates to the newest version; daemons starting together migrate once."""
    errors: list[BaseException] = []

    def start() -> None:
        try:
            PgLedger(pg_url, host_name="h").close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    ledger = PgLedger(pg_url, host_name="h")
    assert SCHEMA_VERSION == len(MIGRATIONS) >= 2
    assert ledger.schema_version() == SCHEMA_VERSION
    assert ledger.migrate() == SCHEMA_VERSION  # nothing left to do
    with psycopg.connect(pg_url) as conn:
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables"
                                             " WHERE schemaname = 'public'")}  # fmt: skip
    assert {"jobs", "transitions", "meta", "gpu_history", "hosts", "clock"} <= tables


def test_migrates_an_older_schema_keeping_its_jobs(pg_url: str, tmp_path: Path) -> None:
    """A ledger left at version 1 by an older daemon is migrated at start; its jobs stay."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        conn.execute(MIGRATIONS[0].encode())
        conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
        conn.execute(
            "INSERT INTO jobs(id, spec_json, input, output, submitter_uid, submitted_at, state,"
            " need_gib, threshold_gib, updated_at) VALUES ('old', '{}', 'i', 'o', 1, 1, 'queued',"
            " 1, 1, 1)"
        )
    ledger = PgLedger(pg_url, host_name="h")
    assert ledger.schema_version() == SCHEMA_VERSION
    assert [j.id for j in ledger.jobs()] == ["old"]
    with psycopg.connect(pg_url) as conn:
        row = conn.execute("SELECT host, fence FROM jobs WHERE id = 'old'").fetchone()
    assert row == (None, 0)


def test_newer_or_missing_schema_is_a_clear_error(pg_url: str) -> None:
    """A reader refuses an unmigrated ledger; any host refuses a schema newer than it knows."""
    with pytest.raises(LedgerError, match=r"schema version 0, not .*start the daemon once"):
        PgLedger(pg_url, host_name="h", readonly=True)
    PgLedger(pg_url, host_name="h").set_meta("schema_version", str(SCHEMA_VERSION + 1))
    for readonly in (False, True):
        with pytest.raises(LedgerError, match="upgrade gpuspool on this host"):
            PgLedger(pg_url, host_name="h", readonly=readonly)


def test_readonly_connection_cannot_write(pg_url: str) -> None:
    """The CLI's read-only connection refuses writes in the database itself."""
    PgLedger(pg_url, host_name="h").close()
    reader = PgLedger(pg_url, host_name="h", readonly=True)
    assert reader.counts() == {}
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        reader.set_draining(True)


def test_unreachable_server_names_the_url_without_password() -> None:
    """A server that does not answer is a LedgerError naming the URL, password hidden."""
    url = "postgresql://u:secret@127.0.0.1:1/db"
    with pytest.raises(LedgerError, match="cannot connect to the ledger at") as info:
        PgLedger(url, host_name="h")
    assert "secret" not in str(info.value) and "u:***@127.0.0.1:1" in str(info.value)
    assert "\n" not in str(info.value) and "\t" not in str(info.value)  # libpq's, made one line
    assert redact_url("postgresql://u@h/db") == "postgresql://u@h/db"


def test_open_ledger_picks_the_backend(tmp_path: Path, pg_url: str) -> None:
    """No ledger_url: SQLite in state_dir; a sqlite:/// URL: that file; postgresql://: shared."""
    s = Settings(state_dir=tmp_path / "state")
    assert s.ledger_location == f"sqlite://{tmp_path}/state/ledger.sqlite3"
    assert isinstance(open_ledger(s), Ledger) and s.ledger_path.exists()
    other = tmp_path / "elsewhere.sqlite3"
    s = Settings(state_dir=tmp_path / "state", ledger_url=f"sqlite://{other}")
    assert s.ledger_path == other and not s.ledger_is_shared
    assert isinstance(open_ledger(s), Ledger) and other.exists()
    s = Settings(state_dir=tmp_path / "state", ledger_url=pg_url, host_name="box-1")
    shared = open_ledger(s)
    assert isinstance(shared, PgLedger) and shared.host_name == "box-1"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("ledger_url", "mysql://x/y", "must start with"),
        ("ledger_url", "sqlite://relative.db", "absolute path"),
        ("host_name", "bad host", "host_name must be"),
        ("host_name", "", "host_name must be"),
    ],
)
def test_bad_ledger_settings_name_the_field(key: str, value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings(**{key: value})


def test_missing_driver_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without psycopg a PostgreSQL URL fails with what to install; SQLite still works."""
    monkeypatch.setitem(sys.modules, "psycopg", None)  # "import psycopg" now raises ImportError
    monkeypatch.delitem(sys.modules, "gpuspool.ledger_pg")
    s = Settings(state_dir=tmp_path, ledger_url="postgresql://u@127.0.0.1/db")
    with pytest.raises(ConfigError, match=r"pip install 'gpuspool\[postgres\]'"):
        open_ledger(s)
    assert isinstance(open_ledger(Settings(state_dir=tmp_path)), Ledger)


class PgHarness(Harness):
    """The tick harness; its settings name the PostgreSQL ledger, which ``open_ledger`` opens."""


def test_daemon_runs_a_job_on_a_postgresql_ledger(tmp_path: Path, pg_url: str) -> None:
    """Intake, waiting reasons, placement, launch and reaping all work on the shared ledger."""
    h = PgHarness(tmp_path, ledger_url=pg_url, host_name="box-1")
    assert isinstance(h.daemon.ledger, PgLedger)
    job = h.submit("a")
    h.tick()
    assert h.state(job) == "queued" and "need 20.0" in h.job(job).reason
    h.set_gpus([gpu_entry(0, 50)])
    for _ in range(3):
        h.tick()
    assert h.state(job) == "running" and h.job(job).gpu_uuid == "GPU-sim-0"
    assert h.settle(job) == "done"
    audit = h.daemon.ledger.audit(job)  # type: ignore[attr-defined]
    assert [t["to_state"] for t in audit] == ["queued", "running", "done"]
    assert {t["host"] for t in audit} == {"box-1"}
    assert not (tmp_path / "state" / "ledger.sqlite3").exists()


def _config(tmp_path: Path, ledger_url: str) -> Path:
    cfg = tmp_path / "gpuspool.toml"
    cfg.write_text(
        f'spool_dir = "{tmp_path / "spool"}"\nstate_dir = "{tmp_path / "state"}"\n'
        f'gpu_source = "file:{tmp_path / "gpus.json"}"\nledger_url = "{ledger_url}"\n'
        'host_name = "box-1"\nlog_format = "json"\n'
    )
    return cfg


def test_daemon_and_cli_stop_clearly_when_the_database_is_unreachable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The daemon exits 2 with ``daemon_cannot_start``; the CLI exits 2 naming the ledger; the
    password shows in neither."""
    from gpuspool.cli import main

    cfg = _config(tmp_path, "postgresql://u:secret@127.0.0.1:1/db")
    proc = subprocess.run(
        [sys.executable, "-m", "gpuspool.cli", "--config", str(cfg), "daemon"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "daemon_cannot_start" in proc.stdout and "cannot connect" in proc.stdout
    assert "Traceback" not in proc.stderr and "secret" not in proc.stdout + proc.stderr
    assert main(["--config", str(cfg), "show", "x"]) == 2
    assert main(["--config", str(cfg), "status"]) == 2
    err = capsys.readouterr().err
    assert "cannot open the ledger" in err and "u:***@127.0.0.1:1" in err
    assert "secret" not in err


def test_cli_reads_and_writes_a_postgresql_ledger(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """status, show and cancel work on the shared ledger as on SQLite."""
    from gpuspool.cli import main

    h = PgHarness(tmp_path, ledger_url=pg_url, host_name="box-1")
    job = h.submit("a")
    h.tick()
    cfg = _config(tmp_path, pg_url)
    capsys.readouterr()
    assert main(["--config", str(cfg), "status", "--json"]) == 0
    assert job in capsys.readouterr().out
    assert main(["--config", str(cfg), "show", job]) == 0
    assert '"submitted"' in capsys.readouterr().out
    assert main(["--config", str(cfg), "cancel", job]) == 0
    assert h.state(job) == "cancelled"


def test_doctor_checks_the_shared_ledger(tmp_path: Path, pg_url: str) -> None:
    """`gpuspool doctor` on a shared ledger: a new database is fine (the daemon's first start
    creates the schema), a reached one lists the hosts' heartbeats, an unreachable one fails
    with the reason and where the set-up is; a single host (SQLite) has no such check."""
    from gpuspool.doctor import check_ledger

    assert check_ledger(Settings(state_dir=tmp_path)) is None
    s = Settings(state_dir=tmp_path, ledger_url=pg_url, host_name="box-1")
    fresh = check_ledger(s)
    assert fresh is not None and fresh.ok and "start the daemon once" in fresh.detail
    ledger = PgLedger(pg_url, host_name="box-1")  # as the daemon: migrates, then heartbeats
    ledger.heartbeat(gpus=[], version="1", draining=False)
    ledger.close()
    reached = check_ledger(s)
    assert reached is not None and reached.ok and "box-1 (0 s ago)" in reached.detail
    down = Settings(state_dir=tmp_path, ledger_url="postgresql://u:pw@127.0.0.1:1/db")
    failed = check_ledger(down)
    assert failed is not None and not failed.ok and "cannot connect" in failed.detail
    assert failed.fix is not None and "docs/cluster.md" in failed.fix and "pw" not in failed.detail
