"""Racing claims on a real PostgreSQL server: no job is ever claimed twice."""
# ruff: noqa: E402 - the driver check runs before the imports that need the driver

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

from tests.pgserver import require_driver

require_driver()

from gpuspool.ledger import OutputClaimed
from gpuspool.ledger_pg import PgLedger
from gpuspool.models import JobSpec

REPO = Path(__file__).parents[2]
JOBS = 1000


def _spec(tmp_path: Path, output: str) -> JobSpec:
    data = {"input": str(tmp_path / "in.jsonl"), "output": str(tmp_path / output)}
    return JobSpec.model_validate({**data, "tokenizer": "tok"})


def test_hosts_accepting_jobs_with_one_output_at_once_record_one(
    pg_url: str, tmp_path: Path
) -> None:
    """Four hosts' intakes add, at the same instant, four jobs writing one output, for 40
    outputs: each output is recorded for exactly one job, and the others are refused."""
    hosts = 4
    ledgers = [PgLedger(pg_url, host_name=f"intake-{h}") for h in range(hosts)]
    start = threading.Barrier(hosts)
    won: list[list[str]] = [[] for _ in range(hosts)]
    refused: list[list[str]] = [[] for _ in range(hosts)]

    def intake(h: int) -> None:
        for n in range(40):
            start.wait(timeout=60)
            job_id = f"out{n}-host{h}"
            try:
                ledgers[h].add(job_id=job_id, spec=_spec(tmp_path, f"same-{n}.jsonl"),
                               submitter_uid=1000 + h, need_gib=1.0, threshold_gib=1.0,
                               spool_file=None, now=float(n))  # fmt: skip
                won[h].append(job_id)
            except OutputClaimed as exc:
                assert exc.other.startswith(f"out{n}-"), exc
                refused[h].append(job_id)

    threads = [threading.Thread(target=intake, args=(h,)) for h in range(hosts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    winners = Counter(job_id.split("-")[0] for w in won for job_id in w)
    assert len(winners) == 40 and set(winners.values()) == {1}, winners.most_common(3)
    assert sum(len(r) for r in refused) == 40 * (hosts - 1)
    assert ledgers[0].counts() == {"queued": 40}
    for ledger in ledgers:
        ledger.close()


def test_racing_hosts_claim_each_of_1000_jobs_once(pg_url: str, tmp_path: Path) -> None:
    """Six processes (three claim the next job with SKIP LOCKED, three fight over every id with
    the conditional claim) drain 1,000 jobs: each is claimed and finished exactly once."""
    ledger = PgLedger(pg_url, host_name="submitter")
    for i in range(JOBS):
        ledger.add(job_id=f"job-{i:04d}", spec=_spec(tmp_path, f"o{i}.jsonl"), submitter_uid=1000,
                   need_gib=1.0, threshold_gib=1.0, spool_file=None, now=float(i))  # fmt: skip
    go = tmp_path / "go"
    racers = [("next", f"host-n{i}") for i in range(3)] + [("ids", f"host-i{i}") for i in range(3)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.cluster.claimer", pg_url, host, mode, str(go)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for mode, host in racers
    ]
    go.touch()
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        reports.append(json.loads(out))

    claims = Counter(job_id for r in reports for job_id, _ in r["claimed"])
    assert len(claims) == JOBS and max(claims.values()) == 1, claims.most_common(3)
    assert all(fence == 1 for r in reports for _, fence in r["claimed"])
    owner = {job_id: r["host"] for r in reports for job_id, _ in r["claimed"]}
    # Both kinds of racer won some jobs, and the conditional claims lost many races.
    assert {h[:6] for h in owner.values()} == {"host-n", "host-i"}
    assert sum(r["lost"] for r in reports) > 0

    assert ledger.counts() == {"done": JOBS}
    for job_id in ("job-0000", "job-0500", "job-0999"):
        audit = ledger.audit(job_id)
        assert [t["to_state"] for t in audit] == ["queued", "running", "done"]
        assert [t["host"] for t in audit[1:]] == [owner[job_id]] * 2
        assert [t["fence"] for t in audit[1:]] == [1, 1]
    running = Counter(t["job_id"] for t in ledger.transitions() if t["to_state"] == "running")
    assert len(running) == JOBS and set(running.values()) == {1}
