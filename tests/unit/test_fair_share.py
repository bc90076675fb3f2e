"""Fair share: decayed usage, the order between submitters, per-user limits, priority clamp."""

from __future__ import annotations

import math

import pytest

from gpuspool.fairshare import (
    Run,
    UsageTracker,
    UserLimits,
    UserState,
    clamp_priority,
    run_usage,
    share_table,
    usage_by_user,
)
from gpuspool.models import GpuSnapshot
from gpuspool.placement import Candidate, GpuView, place

DAY = 86400.0
ALICE, BOB = 1001, 1002


def gpu_view(index: int, free_gib: float = 80.0) -> GpuView:
    snap = GpuSnapshot(
        index=index,
        uuid=f"GPU-{index:04d}-fair",
        name="sim",
        total_mib=80 * 1024,
        free_mib=free_gib * 1024,
        healthy=True,
        error=None,
    )
    return GpuView(snap, (free_gib,) * 3)


def cand(job_id: str, seq: int, uid: int, *, priority: int = 0, need: float = 10) -> Candidate:
    return Candidate(job_id, need, priority, seq, None, uid)


def simulate(
    jobs: list[Candidate], *, n_gpus: int, run_s: float, half_life_s: float, fair: bool
) -> list[str]:
    """Start order of ``jobs`` on ``n_gpus`` GPUs (one job each, ``run_s`` long), tick by tick."""
    waiting = list(jobs)
    running: dict[str, tuple[int, float, str]] = {}  # job -> (uid, start, gpu)
    runs: list[Run] = []
    order: list[str] = []
    now = 0.0
    while waiting:
        for jid, (uid, start, _) in list(running.items()):
            if now - start >= run_s:
                runs.append(Run(jid, uid, start, start + run_s))
                del running[jid]
        busy = {g for _, _, g in running.values()}
        views = [gpu_view(i, 0.0 if f"GPU-{i:04d}-fair" in busy else 80.0) for i in range(n_gpus)]
        live = [Run(jid, u, s, None) for jid, (u, s, _) in running.items()]
        usage = usage_by_user([*runs, *live], now, half_life_s)
        users = {uid: UserState(usage=use) for uid, use in usage.items()}
        d = place(waiting, views, stable_polls=1, users=users, fair=fair)
        for s in d.starts:
            order.append(s.job_id)
            uid = next(j.submitter for j in waiting if j.job_id == s.job_id)
            running[s.job_id] = (uid, now, s.gpu_uuid)
        waiting = [j for j in waiting if j.job_id not in set(order)]
        now += 10.0
    return order


def test_run_usage_decays_by_half_each_half_life() -> None:
    """An hour of GPU time used one half-life ago counts (about) half an hour."""
    h = 3600.0
    fresh = run_usage(0, h, h, DAY)
    old = run_usage(0, h, h + DAY, DAY)
    assert fresh == pytest.approx(h, rel=0.02)
    assert old == pytest.approx(fresh / 2, rel=1e-9)
    assert run_usage(0, h, h, 0) == h  # no decay: plain GPU-seconds
    assert run_usage(10, 5, 20, DAY) == 0.0
    exact = DAY / math.log(2) * (1 - 2 ** (-h / DAY))
    assert fresh == pytest.approx(exact)


def test_usage_by_user_sums_runs_and_counts_running_ones_up_to_now() -> None:
    runs = [Run("a", ALICE, 0, 100), Run("b", ALICE, 100, None), Run("c", BOB, 50, 60)]
    assert usage_by_user(runs, 200, 0) == {ALICE: 200.0, BOB: 10.0}


def test_tracker_matches_a_full_recount_and_folds_each_run_once() -> None:
    """Runs fed in pieces, some twice (the overlap the ledger is read with), give the same
    usage as counting every run from scratch; running jobs count up to now."""
    runs = [Run(f"j{i}", ALICE if i % 3 else BOB, i * 500.0, i * 500.0 + 400) for i in range(40)]
    tracker = UsageTracker(DAY, 0.0)
    now = 0.0
    for i in range(0, 40, 5):
        now = runs[i + 4].end or 0.0
        seen = [r for r in runs if r.end is not None and tracker.since() <= r.end <= now]
        tracker.update([*seen, Run("live", BOB, now - 50, None)], now)
    later = now + 2 * DAY
    expected = usage_by_user([*runs, Run("live", BOB, now - 50, None)], later, DAY)
    got = tracker.usage(later)
    assert got.keys() == expected.keys()
    for uid in got:
        assert got[uid] == pytest.approx(expected[uid], rel=1e-9)
    with pytest.raises(ValueError, match="half-life"):
        UsageTracker(0, 0.0)


def test_single_job_of_second_user_starts_second() -> None:
    """Two users, 200 + 1 jobs, one GPU: Bob's single job starts right after Alice's first."""
    jobs = [cand(f"a{i}", i, ALICE) for i in range(200)] + [cand("b0", 200, BOB)]
    order = simulate(jobs, n_gpus=1, run_s=30, half_life_s=DAY, fair=True)
    assert order[:3] == ["a0", "b0", "a1"]
    fifo = simulate(jobs, n_gpus=1, run_s=30, half_life_s=DAY, fair=False)
    assert fifo.index("b0") == 200


def test_equal_usage_alternates_within_one_tick() -> None:
    """Both users unused, four free GPUs: the starts of one tick alternate between them."""
    jobs = [cand(f"a{i}", i, ALICE) for i in range(4)] + [
        cand(f"b{i}", 10 + i, BOB) for i in range(4)
    ]
    d = place(jobs, [gpu_view(i) for i in range(4)], stable_polls=1, fair=True)
    assert [s.job_id for s in d.starts] == ["a0", "b0", "a1", "b1"]


def test_priority_still_comes_first() -> None:
    """A higher priority job of the heavier user still goes before the lighter user's jobs."""
    users = {ALICE: UserState(usage=1e6), BOB: UserState(usage=0)}
    jobs = [cand("a0", 1, ALICE, priority=5), cand("b0", 2, BOB)]
    d = place(jobs, [gpu_view(0)], stable_polls=1, users=users, fair=True)
    assert [s.job_id for s in d.starts] == ["a0"]


@pytest.mark.parametrize(
    ("alice_ended_ago", "first"),
    [
        (0.0, "b0"),  # Alice just used an hour: Bob first
        (2 * DAY, "b0"),  # two half-lives later she still weighs more than Bob's hour
        (20 * DAY, "a0"),  # long decayed: Alice's old hour weighs less than Bob's recent one
    ],
)
def test_decay_restores_order_over_time(alice_ended_ago: float, first: str) -> None:
    """Alice used 10 GPU-hours, Bob 1 hour an hour ago; as Alice's use ages, her turn returns."""
    now = 30 * DAY
    a_end = now - alice_ended_ago
    runs = [Run("a", ALICE, a_end - 36000, a_end), Run("b", BOB, now - 7200, now - 3600)]
    usage = usage_by_user(runs, now, DAY)
    users = {uid: UserState(usage=u) for uid, u in usage.items()}
    jobs = [cand("a0", 1, ALICE), cand("b0", 2, BOB)]
    d = place(jobs, [gpu_view(0)], stable_polls=1, users=users, fair=True)
    assert [s.job_id for s in d.starts] == [first]


def test_fair_off_is_plain_fifo() -> None:
    users = {ALICE: UserState(usage=1e6)}
    jobs = [cand("a0", 1, ALICE), cand("b0", 2, BOB)]
    d = place(jobs, [gpu_view(0)], stable_polls=1, users=users, fair=False)
    assert [s.job_id for s in d.starts] == ["a0"]


def test_running_limit_holds_and_names_itself() -> None:
    """Alice at 2 of 2 running jobs: none of hers starts, Bob's do, the reason says why."""
    users = {ALICE: UserState(running=2, gpus={"GPU-0000-fair"})}
    jobs = [cand("a0", 1, ALICE), cand("a1", 2, ALICE), cand("b0", 3, BOB)]
    d = place(
        jobs,
        [gpu_view(i) for i in range(3)],
        stable_polls=1,
        users=users,
        limits=UserLimits(max_running=2),
    )
    assert [s.job_id for s in d.starts] == ["b0"]
    assert d.reasons["a0"] == "user limit: 2 of 2 running jobs"
    assert d.reasons["a1"] == "user limit: 2 of 2 running jobs"


def test_running_limit_counts_starts_of_this_tick() -> None:
    jobs = [cand(f"a{i}", i, ALICE) for i in range(4)]
    d = place(
        jobs,
        [gpu_view(i) for i in range(4)],
        stable_polls=1,
        limits=UserLimits(max_running=2),
        fair=True,
    )
    assert [s.job_id for s in d.starts] == ["a0", "a1"]
    assert d.reasons["a2"] == "user limit: 2 of 2 running jobs"


def test_gpu_limit_keeps_new_jobs_on_the_users_gpus() -> None:
    """At 1 of 1 GPUs, Alice's next job may share her GPU but not take a second one."""
    mine = "GPU-0001-fair"
    users = {ALICE: UserState(running=1, gpus={mine})}
    views = [gpu_view(0), gpu_view(1, free_gib=40)]
    d = place(
        [cand("a0", 1, ALICE, need=30)],
        views,
        stable_polls=1,
        users=users,
        limits=UserLimits(max_gpus=1),
    )
    assert [(s.job_id, s.gpu_uuid) for s in d.starts] == [("a0", mine)]
    d = place(
        [cand("a1", 2, ALICE, need=50)],
        views,
        stable_polls=1,
        users=users,
        limits=UserLimits(max_gpus=1),
    )
    assert d.starts == ()
    assert d.reasons["a1"].startswith("user limit: 1 of 1 GPUs in use; GPU 1")


def test_share_table_rows() -> None:
    rows = share_table({ALICE: 300.0, BOB: 100.0}, {ALICE: 2}, {BOB: 5})
    assert rows == [
        {"uid": ALICE, "usage_gpu_s": 300.0, "share": 0.75, "running": 2, "waiting": 0},
        {"uid": BOB, "usage_gpu_s": 100.0, "share": 0.25, "running": 0, "waiting": 5},
    ]


@pytest.mark.parametrize(
    ("priority", "uid", "expected", "noted"),
    [
        (5, ALICE, 5, False),  # named in priority_users
        (5, BOB, 0, True),  # not named: clamped with a note
        (-3, BOB, -3, False),  # anyone may lower their own
        (7, 1003, 7, False),  # in a named group
        (0, BOB, 0, False),
    ],
)
def test_clamp_priority(priority: int, uid: int, expected: int, noted: bool) -> None:
    names = {ALICE: "alice", BOB: "bob", 1003: "carol"}
    groups = {ALICE: ["users"], BOB: ["users"], 1003: ["users", "leads"]}
    got, note = clamp_priority(
        priority,
        uid,
        priority_users=["alice"],
        priority_groups=["leads"],
        user_name=names.get,
        user_groups=lambda u: groups[u],
    )
    assert got == expected
    assert (note is not None) == noted
    if noted:
        assert (
            note
            == f"priority {priority} lowered to 0: bob is not in priority_users or priority_groups"
        )


def test_gpu_limit_reached_on_another_host_says_so() -> None:
    """At the GPU cap with GPUs only elsewhere (a shared ledger), no GPU here may be taken."""
    users = {ALICE: UserState(running=1, gpus={"GPU-on-another-host"})}
    d = place(
        [cand("a0", 1, ALICE)],
        [gpu_view(0)],
        stable_polls=1,
        users=users,
        limits=UserLimits(max_gpus=1),
    )
    assert d.starts == ()
    assert d.reasons["a0"] == (
        "user limit: 1 of 1 GPUs in use; none of them is a GPU of this host this job may use"
    )
    assert "a0" not in d.impossible
