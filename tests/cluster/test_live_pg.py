"""The real ``gpuspool daemon`` process (service loop, timer thread, inotify) on a PostgreSQL
ledger: a job dropped in the spool runs to done, and the CLI sees it."""
# ruff: noqa: E402 - the driver check runs before the imports that need the driver

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.pgserver import require_driver

require_driver()

import pytest

from gpuspool.ledger_pg import PgLedger
from tests.conftest import STUB_WORKER, gpu_entry, wait_until
from tests.integration.conftest import LiveDaemon


class PgLiveDaemon(LiveDaemon):
    """A live daemon whose ledger is the PostgreSQL database at ``url``."""

    def __init__(self, tmp: Path, url: str, **config: Any) -> None:
        super().__init__(tmp, ledger_url=url, **config)
        self.url = url

    def job(self, job_id: str) -> Any:
        ledger = PgLedger(self.url, host_name="reader", readonly=True)
        try:
            return ledger.get(job_id)
        finally:
            ledger.close()


@pytest.fixture
def pg_live(tmp_path: Path, pg_url: str) -> Iterator[PgLiveDaemon]:
    d = PgLiveDaemon(
        tmp_path, pg_url, host_name="box-1", worker_command=[sys.executable, STUB_WORKER],
        worker_extra_args=[],
    )  # fmt: skip
    yield d
    if d.proc is not None and d.proc.poll() is None:
        d.proc.kill()
        d.proc.wait()


def test_live_daemon_runs_a_job_on_postgresql(pg_live: PgLiveDaemon, pg_url: str) -> None:
    pg_live.set_gpus(gpu_entry(0, 50))
    pg_live.start()
    data = pg_live.tmp / "in.jsonl"
    data.write_text('{"audio": "a.wav"}\n')
    job_id = pg_live.submit(data, pg_live.tmp, name="job")
    wait_until(lambda: pg_live.state(job_id) == "done", timeout=60, step=0.1)
    assert (pg_live.tmp / "job.jsonl").exists()
    assert pg_live.stop() == 0
    ledger = PgLedger(pg_url, host_name="reader", readonly=True)
    audit = ledger.audit(job_id)
    assert [t["to_state"] for t in audit] == ["queued", "running", "done"]
    assert {t["host"] for t in audit} == {"box-1"}
    assert not pg_live.ledger_path.exists()  # nothing went to SQLite
    started = [json.loads(line) for line in pg_live.log_path.read_text().splitlines()
               if '"daemon_started"' in line]  # fmt: skip
    assert started[0]["host"] == "box-1" and started[0]["ledger"].startswith("postgresql://")
