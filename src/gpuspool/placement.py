"""Placement: which waiting job starts on which GPU now, and why the others wait. Pure.

A job may start on a GPU when ``free − reservations ≥ threshold`` held for ``stable_polls``
consecutive polls (``GpuView.available_history``), the GPU's state is known, and no other job
started on that GPU at this tick. Jobs are taken by priority (higher first), then submission
order; a job that cannot start does not stop a smaller one behind it from starting elsewhere.
Among the GPUs that fit, the one with the least room is chosen (best fit), so large GPUs stay
free for large jobs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from gpuspool.models import GpuSnapshot


@dataclass(frozen=True, slots=True)
class GpuView:
    """A GPU as placement sees it: the latest snapshot plus its recent availability."""

    snapshot: GpuSnapshot
    #: Available GiB (free − reservations) at each recent poll, oldest first; None = unknown.
    available_history: tuple[float | None, ...]
    reserved_gib: float = 0.0

    @property
    def uuid(self) -> str:
        return self.snapshot.uuid

    @property
    def available_gib(self) -> float | None:
        return self.available_history[-1] if self.available_history else None


class Candidate(NamedTuple):
    """A job that could start now (runnable, not held, not backing off)."""

    job_id: str
    threshold_gib: float
    priority: int
    seq: int
    allowed_gpus: tuple[str | int, ...] | None = None


@dataclass(frozen=True, slots=True)
class Start:
    job_id: str
    gpu_uuid: str
    available_gib: float


@dataclass(frozen=True, slots=True)
class Decision:
    """What one tick decided: the starts, and a reason for every candidate left waiting."""

    starts: tuple[Start, ...]
    reasons: dict[str, str]
    #: Jobs that no GPU of this host can ever fit (the reason says why).
    impossible: frozenset[str]


def _short(uuid: str) -> str:
    return uuid[:12] + "…" if len(uuid) > 13 else uuid


def _allowed(job: Candidate, gpus: Sequence[GpuView]) -> list[GpuView]:
    if job.allowed_gpus is None:
        return list(gpus)
    refs = set(job.allowed_gpus)
    return [g for g in gpus if g.uuid in refs or g.snapshot.index in refs]


def stable_count(history: Sequence[float | None], threshold: float) -> int:
    """How many of the latest polls in a row had at least ``threshold`` GiB available."""
    n = 0
    for value in reversed(history):
        if value is None or value < threshold:
            break
        n += 1
    return n


def _why_not(view: GpuView, threshold: float, stable_polls: int, taken: bool) -> str:
    snap = view.snapshot
    where = f"GPU {snap.index} ({_short(snap.uuid)})"
    if not snap.healthy:
        return f"{where}: state unknown ({snap.error or 'probe error'})"
    if taken:
        return f"{where}: another job started there this poll"
    avail = view.available_gib
    if avail is None or avail < threshold:
        shown = 0.0 if avail is None else avail
        reserved = f" − reserved {view.reserved_gib:.1f}" if view.reserved_gib else ""
        return (
            f"{where}: {shown:.1f} GiB available (free {snap.free_gib:.1f}{reserved}),"
            f" need {threshold:.1f}"
        )
    stable = stable_count(view.available_history, threshold)
    return f"{where}: enough free, stable {stable}/{stable_polls} polls"


def place(
    jobs: Sequence[Candidate],
    gpus: Sequence[GpuView],
    *,
    stable_polls: int,
) -> Decision:
    """Decide the starts of one tick. ``jobs`` may come in any order."""
    ordered = sorted(jobs, key=lambda j: (-j.priority, j.seq))
    started_on: set[str] = set()
    starts: list[Start] = []
    reasons: dict[str, str] = {}
    impossible: set[str] = set()
    # Jobs with the same threshold and allow-list get the same answer until a start changes
    # what is left, so a queue of thousands costs one evaluation per distinct kind of job.
    memo: dict[tuple[float, tuple[str | int, ...] | None], tuple[str, bool]] = {}
    for job in ordered:
        key = (job.threshold_gib, job.allowed_gpus)
        known_answer = memo.get(key)
        if known_answer is not None:
            reasons[job.job_id] = known_answer[0]
            if known_answer[1]:
                impossible.add(job.job_id)
            continue
        allowed = _allowed(job, gpus)
        if not allowed:
            reasons[job.job_id] = (
                f"none of the allowed GPUs {list(job.allowed_gpus or ())} exist on this host"
            )
            impossible.add(job.job_id)
            memo[key] = (reasons[job.job_id], True)
            continue
        known = [g for g in allowed if g.snapshot.healthy and g.snapshot.total_mib > 0]
        if known and len(known) == len(allowed):
            largest = max(g.snapshot.total_gib for g in known)
            if largest < job.threshold_gib:
                reasons[job.job_id] = (
                    f"no GPU here can ever have {job.threshold_gib:.1f} GiB free:"
                    f" largest is {largest:.1f} GiB"
                )
                impossible.add(job.job_id)
                memo[key] = (reasons[job.job_id], True)
                continue
        fitting = [
            g
            for g in allowed
            if g.uuid not in started_on
            and g.snapshot.healthy
            and stable_count(g.available_history, job.threshold_gib) >= stable_polls
        ]
        if fitting:
            best = min(fitting, key=lambda g: (g.available_gib or 0.0, g.snapshot.index))
            started_on.add(best.uuid)
            starts.append(Start(job.job_id, best.uuid, best.available_gib or 0.0))
            memo.clear()
            continue
        # Explain with the GPU that came closest: most available among the known ones.
        closest = max(
            allowed,
            key=lambda g: (
                g.snapshot.healthy,
                g.uuid not in started_on,
                stable_count(g.available_history, job.threshold_gib),
                g.available_gib if g.available_gib is not None else float("-inf"),
            ),
        )
        reasons[job.job_id] = _why_not(
            closest, job.threshold_gib, stable_polls, closest.uuid in started_on
        )
        memo[key] = (reasons[job.job_id], False)
    return Decision(tuple(starts), reasons, frozenset(impossible))
