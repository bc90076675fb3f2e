"""One racing "host" for the claim tests: ``python -m tests.cluster.claimer URL HOST MODE GO``.

It opens its own connection, waits until the file ``GO`` exists (so every racer starts at
once), then claims until nothing is left and finishes each claimed job through its fencing
token. MODE ``next`` claims with ``claim_next`` (SKIP LOCKED); MODE ``ids`` tries every job id in
a shuffled order with the conditional ``claim`` (most attempts lose). It prints one JSON line:
the ids it claimed, with their fencing tokens, and how many claims it lost.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

from gpuspool.ledger import LedgerError
from gpuspool.ledger_pg import PgLedger
from gpuspool.models import JobState


def main(url: str, host: str, mode: str, go: str) -> int:
    ledger = PgLedger(url, host_name=host)
    deadline = time.monotonic() + 60
    while not Path(go).exists():
        if time.monotonic() > deadline:
            return 2
        time.sleep(0.005)
    claimed: list[tuple[str, int]] = []
    lost = 0
    if mode == "next":
        while (claim := ledger.claim_next(now=time.time(), gpu_uuid=f"{host}-gpu")) is not None:
            claimed.append((claim.job.id, claim.fence))
            ledger.fenced_transition(claim.job.id, JobState.DONE, fence=claim.fence,
                                     now=time.time(), finished_at=time.time())  # fmt: skip
    else:
        ids = [j.id for j in ledger.jobs()]
        random.Random(host).shuffle(ids)
        for job_id in ids:
            try:
                claim = ledger.claim(job_id, now=time.time(), gpu_uuid=f"{host}-gpu")
            except LedgerError:
                lost += 1
                continue
            claimed.append((claim.job.id, claim.fence))
            ledger.fenced_transition(job_id, JobState.DONE, fence=claim.fence,
                                     now=time.time(), finished_at=time.time())  # fmt: skip
    print(json.dumps({"host": host, "claimed": claimed, "lost": lost}), flush=True)
    ledger.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
