"""Racing claims on a real PostgreSQL server: no job is ever claimed twice."""
# ruff: noqa: E402 - the driver check runs before the imports that need the driver

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from tests.pgserver import require_driver

require_driver()

from gpuspool.ledger_pg import PgLedger
from gpuspool.models import JobSpec

REPO = Path(__file__).parents[2]
JOBS = 1000


def test_racing_hosts_claim_each_of_1000_jobs_once(pg_url: str, tmp_path: Path) -> None:
    """Six processes (three claim the next job with SKIP LOCKED, three fight over every id with
    the conditional claim) drain 1,000 jobs: each is claimed and finished exactly once."""
    ledger = PgLedger(pg_url, host_name="submitter")
    spec = JobSpec.model_validate(
        {
            "input": str(tmp_path / "in.jsonl"),
            "output": str(tmp_path / "o.jsonl"),
            "tokenizer": "tok",
        }
    )
    for i in range(JOBS):
        ledger.add(job_id=f"job-{i:04d}", spec=spec, submitter_uid=1000, need_gib=1.0,
                   threshold_gib=1.0, spool_file=None, now=float(i))  # fmt: skip
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
