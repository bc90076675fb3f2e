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
from typing import Any, NamedTuple

#: Runs that ended this many half-lives ago weigh under 1/1000 of their length: not loaded.
HORIZON_HALF_LIVES = 10.0
#: A tracker reads again the runs that ended this long before the latest it folded in, so a
#: run whose end is written late (another host's clock, a slow commit) is still counted.
LATE_RUN_MARGIN_S = 600.0


class Run(NamedTuple):
    """One run of a job on one GPU, as the ledger records it (``end`` None: still running)."""

    job_id: str
    uid: int
    start: float
    end: float | None


def run_usage(start: float, end: float, now: float, half_life_s: float) -> float:
    """Decayed GPU-seconds of one run on one GPU from ``start`` to ``end``, seen at ``now``."""
    start, end = min(start, now), min(end, now)
    if end <= start:
        return 0.0
    if half_life_s <= 0:
        return end - start
    rate = math.log(2) / half_life_s
    return (math.exp(-rate * (now - end)) - math.exp(-rate * (now - start))) / rate


def usage_by_user(runs: Iterable[Run], now: float, half_life_s: float) -> dict[int, float]:
    """Each submitter's decayed usage at ``now`` from their runs (running ones up to ``now``)."""
    usage: dict[int, float] = {}
    for run in runs:
        used = run_usage(run.start, now if run.end is None else run.end, now, half_life_s)
        usage[run.uid] = usage.get(run.uid, 0.0) + used
    return usage


def usage_horizon(now: float, half_life_s: float) -> float:
    """The oldest run end worth loading from the ledger."""
    return now - HORIZON_HALF_LIVES * half_life_s


class UsageTracker:
    """Decayed usage per submitter, kept up to date run by run as runs end.

    Decay is a common factor, so the finished runs are one sum per submitter, valid at
    ``_at`` and scaled to any later time: a tick costs one term per submitter and per running
    job, however long the history. ``update`` takes the runs that ended since ``since()`` (and
    the running ones); a run is folded in once, by its (job id, start).
    """

    def __init__(self, half_life_s: float, now: float) -> None:
        if half_life_s <= 0:
            raise ValueError("a usage tracker needs a positive half-life")
        self.half_life_s = half_life_s
        self._at = now
        self._finished: dict[int, float] = {}
        self._cursor = usage_horizon(now, half_life_s)
        self._folded: dict[tuple[str, float], float] = {}  # (job, start) -> end, near the cursor
        self._running: list[Run] = []

    def since(self) -> float:
        """The earliest run end the next ``update`` needs."""
        return self._cursor

    def update(self, runs: Iterable[Run], now: float) -> None:
        """Fold in the runs that ended (each once) and remember the running ones."""
        running: list[Run] = []
        scale = self._scale(now)
        self._finished = {uid: used * scale for uid, used in self._finished.items()}
        self._at = max(self._at, now)
        latest = None
        for run in runs:
            if run.end is None:
                running.append(run)
                continue
            key = (run.job_id, run.start)
            if key in self._folded or run.end < self._cursor:
                continue
            self._folded[key] = run.end
            used = run_usage(run.start, run.end, self._at, self.half_life_s)
            self._finished[run.uid] = self._finished.get(run.uid, 0.0) + used
            latest = run.end if latest is None else max(latest, run.end)
        if latest is not None:
            self._cursor = max(self._cursor, latest - LATE_RUN_MARGIN_S)
            self._folded = {k: end for k, end in self._folded.items() if end >= self._cursor}
        self._running = running

    def usage(self, now: float) -> dict[int, float]:
        """Each submitter's decayed usage at ``now``: finished runs plus running ones so far."""
        scale = self._scale(now)
        usage = {uid: used * scale for uid, used in self._finished.items()}
        for uid, used in usage_by_user(self._running, now, self.half_life_s).items():
            usage[uid] = usage.get(uid, 0.0) + used
        return usage

    def _scale(self, now: float) -> float:
        return math.exp(-math.log(2) * max(0.0, now - self._at) / self.half_life_s)


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


def runs_from_rows(ended: Iterable[Any], live: Iterable[Any]) -> list[Run]:
    """Runs from a ledger's rows, either backend: ``ended`` rows are (job id, uid, start, end)
    (a row without a start is skipped), ``live`` rows (job id, uid, start) of running jobs."""
    runs = [Run(str(r[0]), int(r[1]), float(r[2]), float(r[3])) for r in ended if r[2] is not None]
    runs.extend(Run(str(r[0]), int(r[1]), float(r[2]), None) for r in live)
    return runs
