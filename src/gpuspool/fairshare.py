"""Fair share between submitters: decayed GPU usage, per-user limits, who may raise priority. Pure.

Usage is GPU-seconds weighted by ``2^(-age / half_life)``: a second of GPU time used one
half-life ago counts half as much as one used now (the idea of Slurm's fair-share). A run from
``start`` to ``end`` contributes the integral of that weight over the run, so a long run that
ended a week ago weighs little and one still running weighs its elapsed time, almost in full.
Placement takes, within equal priority, the next job of the submitter with the least usage.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

#: Runs that ended this many half-lives ago weigh under 1/1000 of their length: not loaded.
HORIZON_HALF_LIVES = 10.0


def run_usage(start: float, end: float, now: float, half_life_s: float) -> float:
    """Decayed GPU-seconds of one run on one GPU from ``start`` to ``end``, seen at ``now``."""
    start, end = min(start, now), min(end, now)
    if end <= start:
        return 0.0
    if half_life_s <= 0:
        return end - start
    rate = math.log(2) / half_life_s
    return (math.exp(-rate * (now - end)) - math.exp(-rate * (now - start))) / rate


def usage_by_user(
    runs: Iterable[tuple[int, float, float | None]], now: float, half_life_s: float
) -> dict[int, float]:
    """Each submitter's decayed usage from ``(uid, started_at, ended_at or None if running)``."""
    usage: dict[int, float] = {}
    for uid, start, end in runs:
        used = run_usage(start, now if end is None else end, now, half_life_s)
        usage[uid] = usage.get(uid, 0.0) + used
    return usage


def usage_horizon(now: float, half_life_s: float) -> float:
    """The oldest run end worth loading from the ledger."""
    return now - HORIZON_HALF_LIVES * half_life_s


@dataclass(frozen=True, slots=True)
class UserLimits:
    """Per-submitter caps (None = no cap)."""

    max_running: int | None = None
    max_gpus: int | None = None


@dataclass(slots=True)
class UserState:
    """One submitter as placement sees them this tick (mutated as placement starts jobs)."""

    usage: float = 0.0
    running: int = 0
    gpus: set[str] = field(default_factory=set)

    def blocked_reason(self, limits: UserLimits) -> str | None:
        """Why no job of this user may start at all now, or None."""
        if limits.max_running is not None and self.running >= limits.max_running:
            return f"user limit: {self.running} of {limits.max_running} running jobs"
        return None

    def gpu_restriction(self, limits: UserLimits) -> frozenset[str] | None:
        """The only GPUs a new job of this user may use (at the GPU cap), or None for any."""
        if limits.max_gpus is not None and len(self.gpus) >= limits.max_gpus:
            return frozenset(self.gpus)
        return None


def share_table(
    usage: Mapping[int, float], running: Mapping[int, int], waiting: Mapping[int, int]
) -> list[dict[str, float | int]]:
    """Rows for ``status``: each submitter's usage, share of all usage, running and waiting."""
    uids = sorted(set(usage) | set(running) | set(waiting))
    total = sum(usage.values())
    return [
        {
            "uid": uid,
            "usage_gpu_s": round(usage.get(uid, 0.0), 1),
            "share": round(usage.get(uid, 0.0) / total, 4) if total > 0 else 0.0,
            "running": running.get(uid, 0),
            "waiting": waiting.get(uid, 0),
        }
        for uid in uids
    ]


def clamp_priority(
    priority: int,
    uid: int,
    *,
    priority_users: Iterable[str],
    priority_groups: Iterable[str],
    user_name: Callable[[int], str | None],
    user_groups: Callable[[int], Iterable[str]],
) -> tuple[int, str | None]:
    """The priority a job of ``uid`` gets, and a note when it was lowered.

    Only the users and groups the config names may raise priority above 0; anyone may lower
    their own. The lookups are passed in so that this stays pure (the daemon passes pwd/grp).
    """
    if priority <= 0:
        return priority, None
    name = user_name(uid)
    if name is not None and name in set(priority_users):
        return priority, None
    allowed_groups = set(priority_groups)
    if allowed_groups and allowed_groups.intersection(user_groups(uid)):
        return priority, None
    who = name if name is not None else f"uid {uid}"
    return 0, (
        f"priority {priority} lowered to 0: {who} is not in priority_users or priority_groups"
    )
