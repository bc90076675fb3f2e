"""A host dies mid-job with the real worker (tiny model, CPU): the job resumes on another host
from the partial output on the shared filesystem, its output equal to an uninterrupted run's,
and it starts there within ``host_timeout_s`` + the stable window + one poll."""
# ruff: noqa: E402 - the driver check runs before the imports that need the driver

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

from tests.pgserver import require_driver

require_driver()

import pytest

from gpuspool.ledger_pg import PgLedger
from tests.cluster.test_live_pg import PgLiveDaemon
from tests.conftest import gpu_entry, wait_until

HOST_TIMEOUT_S = 3.0
POLL_S = 0.5
STABLE_POLLS = 2
#: Time for the tick's own work and for the process start on a loaded 2-core machine.
SLACK_S = 1.5


@pytest.fixture
def hosts(tmp_path: Path, pg_url: str) -> Iterator[dict[str, PgLiveDaemon]]:
    made: dict[str, PgLiveDaemon] = {}
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        made[name] = PgLiveDaemon(
            folder, pg_url, host_name=name, host_timeout_s=HOST_TIMEOUT_S,
            poll_interval_s=POLL_S, stable_polls=STABLE_POLLS,
        )  # fmt: skip
    PgLedger(pg_url, host_name="observer").close()  # the schema, before the hosts start
    yield made
    for d in made.values():
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


def test_a_killed_hosts_job_resumes_on_another_host_identically(
    hosts: dict[str, PgLiveDaemon],
    pg_url: str,
    tokenizer_dir: Path,
    audio_input: Path,
    reference_output: bytes,
) -> None:
    a, b = hosts["a"], hosts["b"]
    a.set_gpus(gpu_entry(0, 50))
    b.set_gpus(gpu_entry(0, 5))  # too full: the job starts on a
    a.start()
    b.start()
    job = a.submit(audio_input, tokenizer_dir)
    ledger = PgLedger(pg_url, host_name="observer", readonly=True)
    try:
        wait_until(lambda: (ledger.get(job) and ledger.get(job).progress.get("lines_done", 0)) or 0,
                   timeout=180, step=0.1)  # fmt: skip
        rec = ledger.get(job)
        assert rec.host == "a" and rec.pid
        b.set_gpus(gpu_entry(0, 50))  # b could take it now, but a still holds it
        a.kill9()
        os.killpg(rec.pid, signal.SIGKILL)  # the whole host: its worker dies too, mid-run
        killed = time.time()
        wait_until(lambda: ledger.get(job).state.value == "done", timeout=240, step=0.2)
        trail = ledger.audit(job)
    finally:
        ledger.close()
    states = [(t["to_state"], t["host"]) for t in trail]
    assert states[-3:] == [("interrupted", "b"), ("running", "b"), ("done", "b")], states
    restarted = trail[-2]["at"]
    limit = HOST_TIMEOUT_S + STABLE_POLLS * POLL_S + POLL_S + SLACK_S
    print(f"restarted on b {restarted - killed:.2f} s after a died (limit {limit:.1f} s)")
    assert restarted - killed <= limit
    assert (a.tmp / "job.jsonl").read_bytes() == reference_output
    assert b.stop() == 0
