"""Fair share at tick level: two submitter uids, the fake runner's real processes, fake time."""

from __future__ import annotations

import grp
import os
import pwd
from pathlib import Path

import pytest

from tests.conftest import Harness, gpu_entry

ALICE, BOB = 4001, 4002


def submit_as(h: Harness, uid: int, name: str, **fields: object) -> str:
    """Submit a job whose spool file ``uid`` owns (the daemon takes the owner as submitter)."""
    before = set(os.listdir(h.settings.incoming_dir)) if h.settings.incoming_dir.exists() else set()
    job = h.submit(name, **fields)
    (new,) = set(os.listdir(h.settings.incoming_dir)) - before
    os.chown(h.settings.incoming_dir / new, uid, -1)
    return job


def running(h: Harness) -> list[str]:
    rows = h.daemon.ledger.status_rows(finished_limit=0)
    return sorted(r["name"] for r in rows if r["state"] == "running")


def start_two(h: Harness) -> list[str]:
    """Alice drops three jobs, then Bob one; tick until two run; the names of those two."""
    h.env["STUB_MODE"] = "sleep"
    h.set_gpus([gpu_entry(0, 80)])
    for i in range(3):
        submit_as(h, ALICE, f"a{i}")
    h.settle_intake()  # Alice's jobs are queued first ...
    submit_as(h, BOB, "b0")  # ... then Bob's (intake takes owners in turn, not files in order)
    for _ in range(20):
        h.tick()
        if len(running(h)) >= 2:
            break
    names = running(h)
    h.daemon.stop_all(h.now, hard=True)
    for _ in range(40):
        h.tick(0.1)
        if not running(h):
            break
    return names


@pytest.mark.parametrize(("half_life", "expected"), [(86400.0, ["a0", "b0"]), (0.0, ["a0", "a1"])])
def test_second_start_goes_to_the_unused_submitter(
    tmp_path: Path, half_life: float, expected: list[str]
) -> None:
    """Fair share on: Bob's single job starts right after Alice's first; off: plain FIFO."""
    h = Harness(tmp_path, fair_share_half_life_s=half_life)
    assert start_two(h) == expected
    subs = {r["name"]: r["submitter_uid"] for r in h.daemon.ledger.status_rows(finished_limit=None)}
    assert subs["a0"] == ALICE and subs["b0"] == BOB


def test_running_limit_waits_with_its_reason(tmp_path: Path) -> None:
    """max_running_per_user = 1: Alice's second job waits, saying so; Bob's job runs."""
    h = Harness(tmp_path, max_running_per_user=1)
    h.env["STUB_MODE"] = "sleep"
    h.set_gpus([gpu_entry(0, 80)])
    a0 = submit_as(h, ALICE, "a0")
    a1 = submit_as(h, ALICE, "a1")
    submit_as(h, BOB, "b0")
    for _ in range(12):
        h.tick()
    try:
        assert running(h) == ["a0", "b0"]
        assert h.state(a1) == "queued"
        assert h.job(a1).reason == "user limit: 1 of 1 running jobs"
        assert h.state(a0) == "running"
    finally:
        h.daemon.stop_all(h.now, hard=True)
        for _ in range(40):
            h.tick(0.1)
            if not running(h):
                break


def test_positive_priority_of_an_unnamed_user_is_clamped(tmp_path: Path) -> None:
    """A job of a uid not in priority_users/groups asking priority 5 gets 0, noted in show."""
    h = Harness(tmp_path)
    job = submit_as(h, ALICE, "a0", priority=5)
    low = submit_as(h, ALICE, "a1", priority=-2)
    h.tick()
    assert h.job(job).priority == 0
    assert h.job(low).priority == -2
    first = h.daemon.ledger.transitions(job)[0]
    assert first["detail"] == (
        "submitted; priority 5 lowered to 0: uid 4001 is not in priority_users or priority_groups"
    )
    assert h.daemon.ledger.transitions(low)[0]["detail"] == "submitted"


def test_named_users_and_groups_and_the_daemons_user_keep_their_priority(
    tmp_path: Path,
) -> None:
    """priority_users and priority_groups name who may raise priority; the daemon's own user
    (here root) always may."""
    nobody = pwd.getpwnam("nobody")
    group = grp.getgrgid(nobody.pw_gid).gr_name
    for n, settings in enumerate(({"priority_users": ["nobody"]}, {"priority_groups": [group]})):
        (tmp_path / str(n)).mkdir()
        h = Harness(tmp_path / str(n), **settings)
        job = submit_as(h, nobody.pw_uid, "a0", priority=5)
        mine = h.submit("a1", priority=7)
        h.tick()
        assert h.job(job).priority == 5
        assert h.daemon.ledger.transitions(job)[0]["detail"] == "submitted"
        assert h.job(mine).priority == 7
    (tmp_path / "none").mkdir()
    h = Harness(tmp_path / "none")
    job = submit_as(h, nobody.pw_uid, "a0", priority=5)
    h.tick()
    assert h.job(job).priority == 0
    assert "nobody is not in priority_users" in h.daemon.ledger.transitions(job)[0]["detail"]


def test_metrics_and_status_show_each_submitter(tmp_path: Path) -> None:
    """Per-user running and waiting counts in the metrics (off with metrics_user_labels =
    false), and each submitter's share and running count in the root status data."""
    from prometheus_client import generate_latest

    from gpuspool.metrics import DaemonMetrics
    from gpuspool.views import status_data

    h = Harness(tmp_path, max_running_per_user=1)
    h.env["STUB_MODE"] = "sleep"
    h.set_gpus([gpu_entry(0, 80)])
    submit_as(h, ALICE, "a0")
    submit_as(h, ALICE, "a1")
    submit_as(h, BOB, "b0")
    try:
        for _ in range(12):
            h.tick()
        assert running(h) == ["a0", "b0"]
        m = DaemonMetrics()
        m.observe(h.daemon)
        value = m.registry.get_sample_value
        assert value("gpuspool_user_jobs", {"user": str(ALICE), "state": "running"}) == 1
        assert value("gpuspool_user_jobs", {"user": str(ALICE), "state": "waiting"}) == 1
        assert value("gpuspool_user_jobs", {"user": str(BOB), "state": "waiting"}) == 0
        h.tick(100.0)
        data = status_data(h.daemon.ledger, h.now, fair_share_half_life_s=86400.0)
        subs = {row["uid"]: row for row in data["submitters"]}
        assert subs[ALICE]["running"] == 1 and subs[ALICE]["waiting"] == 1
        assert subs[BOB]["running"] == 1 and subs[BOB]["waiting"] == 0
        assert subs[ALICE]["usage_gpu_s"] > 100 and subs[BOB]["usage_gpu_s"] > 100
        assert subs[ALICE]["share"] + subs[BOB]["share"] == pytest.approx(1.0, abs=1e-3)
        own = status_data(h.daemon.ledger, h.now, submitter_uid=ALICE, fair_share_half_life_s=1)
        assert "submitters" not in own  # a submitter's own view names no one else
        assert b"gpuspool_user_jobs{" in generate_latest(m.registry)
        (tmp_path / "off").mkdir()
        off = Harness(tmp_path / "off", metrics_user_labels=False)
        submit_as(off, ALICE, "x0")
        off.tick()
        m_off = DaemonMetrics()
        m_off.observe(off.daemon)
        assert b"gpuspool_user_jobs" not in generate_latest(m_off.registry)
    finally:
        h.daemon.stop_all(h.now, hard=True)
        for _ in range(40):
            h.tick(0.1)
            if not running(h):
                break
