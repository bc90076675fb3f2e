"""The PostgreSQL server restarting under an open ledger."""
# ruff: noqa: E402 - the driver check runs before the imports that need the driver

from __future__ import annotations

from pathlib import Path

from tests.pgserver import PgServer, require_driver

require_driver()

import psycopg
import pytest

from gpuspool.ledger_pg import PgLedger
from gpuspool.models import JobState
from tests.cluster.test_hosts import add


def test_ledger_reconnects_after_the_server_restarts(
    pg_server: PgServer, pg_url: str, tmp_path: Path
) -> None:
    """The call that meets the cut connection fails (nothing is retried blindly); the next
    one connects afresh and sees everything committed before the restart."""
    ledger = PgLedger(pg_url, host_name="a")
    reader = PgLedger(pg_url, host_name="r", readonly=True)
    add(ledger, tmp_path, "j")
    pg_server.restart()
    with pytest.raises(psycopg.OperationalError):
        ledger.counts()
    assert ledger.counts() == {"queued": 1}
    ledger.transition("j", JobState.RUNNING, now=2.0, expect=[JobState.QUEUED])
    with pytest.raises(psycopg.OperationalError):
        reader.counts()
    assert reader.counts() == {"running": 1}
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):  # still read-only
        reader.set_draining(True)
    assert [t["to_state"] for t in reader.transitions("j")] == ["queued", "running"]
