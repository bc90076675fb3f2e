"""A job's reported GPU peak, which sets its reservation and its footprint for yielding.

Once a worker reports its peak, its reservation falls to that figure, so the rest of the card
is offered to others. The figure comes from the job's own process, which its submitter may
forge: reported as 10^15 GiB it reserved the whole card (and more) for as long as the job ran,
and no other job started on it. The peak may only lower a job's reservation, never raise it
above the need the daemon estimated. Real users, the real daemon and the stand-in worker.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from tests.conftest import gpu_entry, wait_until
from tests.integration.conftest import wait_state
from tests.reliability import test_attacks_review as review
from tests.reliability.submitters import SYSTEM_PYTHON, Submitter
from tests.reliability.test_attacks_review import accepted_id, drop

#: The review's fixtures: a world folder every user can reach, two submitters, live daemons.
world, pair, make_daemon = review.world, review.pair, review.make_daemon

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates users and runs as them"),
    pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason=f"no {SYSTEM_PYTHON}"),
]


def test_a_forged_peak_reserves_no_more_than_the_jobs_need(
    make_daemon: Any, pair: tuple[Submitter, Submitter]
) -> None:
    attacker, other = pair
    d = make_daemon()
    d.set_gpus(gpu_entry(0, 50))
    d.start(env={**os.environ, "GPUSPOOL_JOB_ENV": json.dumps({"STUB_MODE": "greedy"})})
    drop(d, attacker, "greedy")
    greedy = wait_until(lambda: accepted_id(d, "greedy"), 60)
    assert wait_state(d, greedy, {"running"}, timeout=60) == "running"
    wait_until(lambda: (d.job(greedy).progress or {}).get("gpu_peak_gib") == 1e15, 30)
    drop(d, other, "next")
    job = wait_until(lambda: accepted_id(d, "next"), 60)
    try:
        wait_state(d, job, {"running"}, timeout=20)
    except AssertionError:
        pytest.fail(f"the other job did not start: {d.job(job).reason}")
    assert d.stop() == 0
