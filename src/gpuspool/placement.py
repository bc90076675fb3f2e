"""Placement: which waiting job starts on which GPU now, and why the others wait. Pure.

A job may start on a GPU when ``free − reservations ≥ threshold`` held for ``stable_polls``
consecutive polls (``GpuView.available_history``), the GPU's state is known, and no other job
started on that GPU at this tick. Jobs are taken by priority (higher first); within equal
priority, with fair share on, from the submitter with the least decayed GPU usage
(``fairshare``), then in submission order (plain FIFO when fair share is off). A job that cannot
start does not stop a smaller one behind it from starting elsewhere. Per-submitter limits
(running jobs, GPUs in use) hold a job back with a "user limit" reason. A job skips the GPUs
it yielded on until their cool-down is over (``Candidate.avoid``).
Among the GPUs that fit, the one with the least room is chosen (best fit), so large GPUs stay
free for large jobs.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from operator import attrgetter
from typing import NamedTuple

from gpuspool.fairshare import UserLimits, UserState
from gpuspool.models import GpuSnapshot

#: Usage charged to a submitter for each start within one tick, so that submitters with equal
#: usage alternate instead of the earliest submitter taking every free GPU at once.
START_CHARGE_GPU_S = 1.0


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
    submitter: int = 0
    #: GPUs it must skip for now: it yielded there and their cool-down is not over.
    avoid: frozenset[str] = frozenset()


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
    #: How near each waiting job is to a start here: the GiB its closest GPU lacks (0 once one
    #: has enough free); ``inf`` where no GPU of this host can take it now. On a shared ledger
    #: the hosts' reasons are compared by it (the nearest host's is the one users see).
    distance: dict[str, float] = field(default_factory=dict)
    #: Waiting jobs whose only obstacle is time, in the order placement took them: their closest
    #: GPU has had enough free for fewer than ``stable_polls`` polls (not one another job took
    #: this poll, nor one they cool down on). What the daemon prestarts a worker for.
    settling: tuple[str, ...] = ()


#: The distance of a job that cannot start here for a reason memory will not change.
FAR = float("inf")


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


def _why_not(view: GpuView, threshold: float, stable_polls: int, taken: bool) -> tuple[str, float]:
    """Why the job's closest GPU does not take it now, and the job's distance (``Decision``).

    A GPU with enough free that has not yet held it for ``stable_polls`` polls says so without
    counting the polls: a count would change the wording of every waiting job's reason at each
    poll while a GPU frees, and each change is a write per waiting job."""
    snap = view.snapshot
    where = f"GPU {snap.index} ({_short(snap.uuid)})"
    if not snap.healthy:
        return f"{where}: state unknown ({snap.error or 'probe error'})", FAR
    if taken:
        return f"{where}: another job started there this poll", 0.0
    avail = view.available_gib
    if avail is None or avail < threshold:
        shown = 0.0 if avail is None else avail
        reserved = f" − reserved {view.reserved_gib:.1f}" if view.reserved_gib else ""
        return (
            f"{where}: {shown:.1f} GiB available (free {snap.free_gib:.1f}{reserved}),"
            f" need {threshold:.1f}"
        ), threshold - shown
    return f"{where}: enough free, starts once it stays so for {stable_polls} polls", 0.0


def _fair_order(level: Sequence[Candidate], users: Mapping[int, UserState]) -> Iterator[Candidate]:
    """One priority level's jobs (in submission order), next always from the submitter with
    the least usage now.

    Usage is read again each time a submitter's turn comes back, so a start charged by the
    caller between two yields moves that submitter back in line. A k-way merge: O(n log users),
    and a submitter that stays first yields on without touching the heap.
    """
    queues: dict[int, list[Candidate]] = {}
    for job in reversed(level):
        queues.setdefault(job.submitter, []).append(job)  # reversed: pop() gives the earliest
    heap = [(users[uid].usage, q[-1].seq, uid) for uid, q in queues.items()]
    heapq.heapify(heap)
    while heap:
        _, _, uid = heapq.heappop(heap)
        queue = queues[uid]
        user = users[uid]
        while queue:
            yield queue.pop()
            if not queue or not heap:
                continue
            if (user.usage, queue[-1].seq, uid) > heap[0]:
                heapq.heappush(heap, (user.usage, queue[-1].seq, uid))
                break


def _ordered(
    jobs: Sequence[Candidate], users: Mapping[int, UserState], fair: bool
) -> Iterator[Candidate]:
    """Jobs in the order placement takes them (priority first; see the module docstring)."""
    by_priority = sorted(jobs, key=lambda j: (-j.priority, j.seq))
    if not fair:
        yield from by_priority
        return
    for _, level in groupby(by_priority, key=attrgetter("priority")):
        yield from _fair_order(list(level), users)  # each level is in submission order


class _NoStart(NamedTuple):
    """Why a job does not start here now (``_place_one``)."""

    reason: str
    #: It never can on this host.
    never: bool
    #: Its distance (``Decision.distance``).
    far: float
    #: It only waits for its GPU's reading to settle (``Decision.settling``).
    settles: bool = False


def place(
    jobs: Sequence[Candidate],
    gpus: Sequence[GpuView],
    *,
    stable_polls: int,
    users: Mapping[int, UserState] | None = None,
    limits: UserLimits | None = None,
    fair: bool = False,
) -> Decision:
    """Decide the starts of one tick. ``jobs`` may come in any order.

    ``users`` holds each submitter's usage, running jobs and GPUs in use (missing = none); it is
    updated in place as jobs start. ``fair`` orders equal priorities by usage (else FIFO);
    ``limits`` caps each submitter's running jobs and GPUs.
    """
    limits = limits or UserLimits()
    states: dict[int, UserState] = dict(users or {})
    for uid in {j.submitter for j in jobs} - states.keys():
        states[uid] = UserState()
    started_on: set[str] = set()
    starts: list[Start] = []
    reasons: dict[str, str] = {}
    distance: dict[str, float] = {}
    impossible: set[str] = set()
    settling: list[str] = []
    # Jobs with the same threshold, allow-list and GPU restriction get the same answer until a
    # start changes what is left, so a queue of thousands costs one evaluation per kind of job.
    Key = tuple[float, tuple[str | int, ...] | None, frozenset[str] | None, frozenset[str]]
    memo: dict[Key, _NoStart] = {}
    limited = limits.max_running is not None or limits.max_gpus is not None
    only: frozenset[str] | None = None
    for job in _ordered(jobs, states, fair):
        if limited:  # the common case, no caps, skips this per-job work
            user = states[job.submitter]
            blocked = user.blocked_reason(limits)
            if blocked is not None:
                reasons[job.job_id] = blocked
                distance[job.job_id] = FAR
                continue
            only = user.gpu_restriction(limits)
        key = (job.threshold_gib, job.allowed_gpus, only, job.avoid)
        answer = memo.get(key)
        if answer is None:
            placed = _place_one(job, gpus, only, started_on, stable_polls)
            if isinstance(placed, Start):
                started_on.add(placed.gpu_uuid)
                starts.append(placed)
                user = states[job.submitter]
                user.usage += START_CHARGE_GPU_S
                user.running += 1
                user.gpus.add(placed.gpu_uuid)
                memo.clear()
                continue
            answer = placed
            if only is not None and not answer.never:
                limit = f"user limit: {len(only)} of {limits.max_gpus} GPUs in use"
                answer = answer._replace(reason=f"{limit}; {answer.reason}")
            memo[key] = answer
        reasons[job.job_id] = answer.reason
        distance[job.job_id] = answer.far
        if answer.never:
            impossible.add(job.job_id)
        if answer.settles:
            settling.append(job.job_id)
    return Decision(tuple(starts), reasons, frozenset(impossible), distance, tuple(settling))


def _place_one(
    job: Candidate,
    gpus: Sequence[GpuView],
    only: frozenset[str] | None,
    started_on: set[str],
    stable_polls: int,
) -> Start | _NoStart:
    """Where ``job`` starts now, or why not."""
    allowed = _allowed(job, gpus)
    if not allowed:
        return _NoStart(
            f"none of the allowed GPUs {list(job.allowed_gpus or ())} exist on this host",
            True,
            FAR,
        )
    known = [g for g in allowed if g.snapshot.healthy and g.snapshot.total_mib > 0]
    if known and len(known) == len(allowed):
        largest = max(g.snapshot.total_gib for g in known)
        if largest < job.threshold_gib:
            return _NoStart(
                f"no GPU here can ever have {job.threshold_gib:.1f} GiB free:"
                f" largest is {largest:.1f} GiB",
                True,
                FAR,
            )
    if only is not None:
        allowed = [g for g in allowed if g.uuid in only]
        if not allowed:
            return _NoStart("none of them is a GPU of this host this job may use", False, FAR)
    fitting = [
        g
        for g in allowed
        if g.uuid not in started_on
        and g.snapshot.healthy
        and stable_count(g.available_history, job.threshold_gib) >= stable_polls
    ]
    if job.avoid and fitting and all(g.uuid in job.avoid for g in fitting):
        g = fitting[0]
        where = f"GPU {g.snapshot.index} ({_short(g.uuid)})"
        # Static words (no seconds left): a reason that changed at every tick would be
        # rewritten at every tick. The cool-down lasts as long as the stranger stays.
        return _NoStart(
            f"{where}: cool-down after a yield there, until no process gpuspool did not"
            " start has been on it for yield_cooldown_s",
            False,
            FAR,
        )
    fitting = [g for g in fitting if g.uuid not in job.avoid]
    if fitting:
        best = min(fitting, key=lambda g: (g.available_gib or 0.0, g.snapshot.index))
        return Start(job.job_id, best.uuid, best.available_gib or 0.0)
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
    taken = closest.uuid in started_on
    reason, far = _why_not(closest, job.threshold_gib, stable_polls, taken)
    settles = far == 0.0 and not taken and closest.uuid not in job.avoid
    return _NoStart(reason, False, far, settles)
