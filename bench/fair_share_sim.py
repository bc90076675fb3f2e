"""Fair share against plain FIFO: a simulated day of mixed submissions from 5 users on 8 GPUs.

    python bench/fair_share_sim.py                  # prints the table
    python bench/fair_share_sim.py --seed 2 --half-life-s 3600

Pure and fast: simulated time runs from event to event (a submission or a job's end) through
``placement.place`` with the same ``fairshare`` usage the daemon computes, one job per GPU. It
reports each user's mean and 95th-percentile wait (submission to start) under plain FIFO and
under fair share, and how many GPU-hours each used.
"""

from __future__ import annotations

import argparse
import heapq
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gpuspool.fairshare import Run, UserState, usage_by_user, usage_horizon
from gpuspool.models import GpuSnapshot
from gpuspool.placement import Candidate, GpuView, place

HOUR = 3600.0


@dataclass(frozen=True)
class SimJob:
    job_id: str
    user: str
    submitted: float
    run_s: float


def workload(seed: int) -> list[SimJob]:
    """One day of five users' submissions (about 180 GPU-hours asked of 192 available)."""
    rng = random.Random(seed)
    jobs: list[tuple[str, float, float]] = []
    # bulk: drops 300 jobs at 08:00, 10-30 min each.
    jobs += [("bulk", 8 * HOUR + i, rng.uniform(600, 1800)) for i in range(300)]
    # steady: one short job every 15 min all day, 5-10 min each.
    jobs += [("steady", i * 900.0, rng.uniform(300, 600)) for i in range(96)]
    # bursty: 50 jobs at 10:00 and 50 at 15:00, 10-20 min each.
    for at in (10 * HOUR, 15 * HOUR):
        jobs += [("bursty", at + i, rng.uniform(600, 1200)) for i in range(50)]
    # daytime: 40 jobs spread over 09:00-18:00, 20-60 min each.
    jobs += [
        ("daytime", rng.uniform(9 * HOUR, 18 * HOUR), rng.uniform(1200, 3600)) for _ in range(40)
    ]
    # long: 10 jobs of 1-2 h at random times.
    jobs += [("long", rng.uniform(0, 20 * HOUR), rng.uniform(HOUR, 2 * HOUR)) for _ in range(10)]
    jobs.sort(key=lambda j: j[1])
    return [SimJob(f"j{i}", user, at, run) for i, (user, at, run) in enumerate(jobs)]


def _views(n_gpus: int, busy: set[str]) -> list[GpuView]:
    views = []
    for i in range(n_gpus):
        uuid = f"GPU-sim-{i}"
        free = 0.0 if uuid in busy else 80.0
        snap = GpuSnapshot(
            index=i, uuid=uuid, name="sim", total_mib=80 * 1024, free_mib=free * 1024, healthy=True
        )
        views.append(GpuView(snap, (free,)))
    return views


def simulate(jobs: list[SimJob], n_gpus: int, half_life_s: float) -> dict[str, float]:
    """Each job's wait (start − submission), running every job to its end."""
    uids = {u: n for n, u in enumerate(sorted({j.user for j in jobs}))}
    by_id = {j.job_id: j for j in jobs}
    arrivals = list(jobs)
    waiting: dict[str, Candidate] = {}
    running: dict[str, tuple[int, float, str]] = {}  # job -> (uid, start, gpu)
    ends: list[tuple[float, str]] = []
    runs: list[Run] = []
    waits: dict[str, float] = {}
    seq = 0
    now = 0.0
    while arrivals or ends or waiting:
        while ends and ends[0][0] <= now:
            _, jid = heapq.heappop(ends)
            uid, start, _ = running.pop(jid)
            runs.append(Run(jid, uid, start, now))
        while arrivals and arrivals[0].submitted <= now:
            j = arrivals.pop(0)
            seq += 1
            waiting[j.job_id] = Candidate(j.job_id, 10.0, 0, seq, None, uids[j.user])
        if waiting and len(running) < n_gpus:
            horizon = usage_horizon(now, half_life_s) if half_life_s > 0 else now
            recent = [r for r in runs if r.end is not None and r.end >= horizon]
            live = [Run(jid, u, s, None) for jid, (u, s, _) in running.items()]
            usage = usage_by_user([*recent, *live], now, half_life_s)
            users = {uid: UserState(usage=use) for uid, use in usage.items()}
            busy = {g for _, _, g in running.values()}
            decision = place(
                list(waiting.values()),
                _views(n_gpus, busy),
                stable_polls=1,
                users=users,
                fair=half_life_s > 0,
            )
            for s in decision.starts:
                cand = waiting.pop(s.job_id)
                job = by_id[s.job_id]
                waits[s.job_id] = now - job.submitted
                running[s.job_id] = (cand.submitter, now, s.gpu_uuid)
                heapq.heappush(ends, (now + job.run_s, s.job_id))
        upcoming = [t for t in (arrivals[0].submitted if arrivals else None,
                                ends[0][0] if ends else None) if t is not None]  # fmt: skip
        if not upcoming:
            break
        now = max(now, min(upcoming))
    return waits


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--half-life-s", type=float, default=86400.0)
    args = parser.parse_args()
    jobs = workload(args.seed)
    t0 = time.perf_counter()
    fifo = simulate(jobs, args.gpus, 0.0)
    fair = simulate(jobs, args.gpus, args.half_life_s)
    took = time.perf_counter() - t0
    users = sorted({j.user for j in jobs})
    asked = sum(j.run_s for j in jobs) / HOUR
    print(
        f"{len(jobs)} jobs from {len(users)} users over one day on {args.gpus} GPUs"
        f" ({asked:.0f} GPU-h asked of {24 * args.gpus} available), seed {args.seed},"
        f" fair_share_half_life_s = {args.half_life_s:g}; both runs took {took:.1f} s"
    )
    print("waits in minutes (submission to start); every job runs to its end")
    head = (
        f"{'user':<8} {'jobs':>5} {'GPU-h':>6}  {'FIFO mean':>9} {'p95':>6}"
        f"  {'fair mean':>9} {'p95':>6}"
    )
    print(head)
    print("-" * len(head))
    for user in users:
        ids = [j.job_id for j in jobs if j.user == user]
        gpu_h = sum(j.run_s for j in jobs if j.user == user) / HOUR
        a = [fifo[i] / 60 for i in ids]
        b = [fair[i] / 60 for i in ids]
        print(
            f"{user:<8} {len(ids):>5} {gpu_h:>6.1f}  {statistics.mean(a):>9.1f} {_p95(a):>6.1f}"
            f"  {statistics.mean(b):>9.1f} {_p95(b):>6.1f}"
        )
    a_all = [v / 60 for v in fifo.values()]
    b_all = [v / 60 for v in fair.values()]
    print(
        f"{'all':<8} {len(jobs):>5} {asked:>6.1f}  {statistics.mean(a_all):>9.1f}"
        f" {_p95(a_all):>6.1f}  {statistics.mean(b_all):>9.1f} {_p95(b_all):>6.1f}"
    )


if __name__ == "__main__":
    main()
