"""Fair share with the real daemon and two real users submitting through ``gpuspool submit``.

Alice queues three jobs, then Bob one, while another tenant holds the GPU; when it frees, the
card fits one job at a time. Alice's first job runs first (neither has used a GPU yet, so
submission order decides), then Bob's single job, ahead of Alice's other two: under plain FIFO
it would have been last.
"""

from __future__ import annotations

import os

import pytest

from tests.conftest import gpu_entry, wait_until
from tests.integration.conftest import LiveDaemon, wait_state
from tests.reliability.submitters import SYSTEM_PYTHON, Submitter

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates users and runs as them"),
    pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason=f"no {SYSTEM_PYTHON}"),
]


def test_a_single_job_of_a_second_user_starts_second(
    live: LiveDaemon, alice: Submitter, bob: Submitter
) -> None:
    live.set_gpus(gpu_entry(0, 10, total_gib=80))  # held by another tenant
    live.start()
    mine = [alice.submit(live.config, f"a{i}") for i in range(3)]
    for job in mine:
        wait_until(lambda job=job: live.state(job) == "queued", timeout=60)
    theirs = bob.submit(live.config, "b0")
    wait_until(lambda: live.state(theirs) == "queued", timeout=60)
    live.set_gpus(gpu_entry(0, 25, total_gib=80))  # room for one job (threshold 20) at a time
    for job in [*mine, theirs]:
        assert wait_state(live, job, {"done", "failed"}, timeout=120) == "done"
    started = {job: live.job(job).started_at for job in [*mine, theirs]}
    order = sorted(started, key=lambda job: started[job])
    assert order == [mine[0], theirs, mine[1], mine[2]], order
    assert live.stop() == 0
