"""Polite scavenging: when a running job steps aside for another user's process. Pure.

gpuspool borrows GPUs other users left idle; when their owner comes back, the job yields (the
daemon stops it with SIGTERM, it checkpoints and waits again). A GPU has *others* on it when

- ``yield_on_foreign_process``: NVML shows a process on it that is not one of this host's job
  processes (the caller says which pids are ours: each job's process, its session and its
  descendants), or
- ``yield_when_free_below_gib = N``: its free memory is under N although our own jobs there,
  at their footprint (their estimated need, lowered to the peak their worker reported, and at
  least what NVML shows them using), would leave N free: others' processes push it under.

A process that was already on the GPU when the job started (or, for a job adopted after a
restart, when the watch first saw it) does not count for that job: a job yields to a process
that *appears*, so it never starts only to yield at once; unless that process then takes more
than :data:`TOLERATED_GROWTH_GIB` beyond what it held then (an idle notebook kernel whose owner
starts training in it: its owner came back as surely as with a new process). A job yields
once its GPU had others on it on ``stable_polls`` polls in a row. It then skips that GPU
until the GPU has had no others for ``yield_cooldown_s`` (other GPUs it may use at once).
:class:`YieldWatch` keeps that state; it is fed one poll per tick and answers which jobs must
yield now and which GPUs each waiting job must skip. No clock, no process table: the daemon
hands in ``now`` and the pids, so the rules are tested with fake time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gpuspool.logs import iso_timestamp
from gpuspool.models import GpuProcess, GpuSnapshot

#: GiB a process that was on the GPU when the job started may grow by and still be tolerated.
TOLERATED_GROWTH_GIB = 1.0


@dataclass(frozen=True, slots=True)
class Policy:
    """The host's yield settings."""

    on_foreign_process: bool
    free_below_gib: float
    stable_polls: int
    cooldown_s: float

    @property
    def active(self) -> bool:
        return self.on_foreign_process or self.free_below_gib > 0


@dataclass(frozen=True, slots=True)
class OurJob:
    """A running job of this host, as the yield rules see it."""

    job_id: str
    gpu_uuid: str
    #: GiB it takes at most: its need, lowered to its reported peak (never less than NVML shows).
    footprint_gib: float


@dataclass(frozen=True, slots=True)
class Trigger:
    """A job whose GPU has had others on it for ``stable_polls`` polls: it should yield."""

    job_id: str
    gpu_uuid: str
    gpu_index: int
    #: The largest process that is not ours (None: only the free-memory rule fired, and NVML
    #: lists no process of anyone else, as inside some containers).
    pid: int | None
    #: What fired, in words ("a process not started by gpuspool", "free 3.1 GiB < 10 GiB").
    why: str


def guests(gpu: GpuSnapshot, ours: Iterable[int]) -> list[GpuProcess]:
    """The processes on ``gpu`` that are not ours, the largest first."""
    mine = set(ours)
    found = [p for p in gpu.processes if p.pid not in mine]
    return sorted(found, key=lambda p: -(p.used_mib or 0.0))


def pressure(gpu: GpuSnapshot, ours_gib: float, free_below_gib: float) -> bool:
    """Whether others' processes keep ``gpu``'s free memory under ``free_below_gib``: it is
    under, though our jobs there (``ours_gib`` at their footprint) alone would leave that much."""
    if free_below_gib <= 0:
        return False
    return gpu.free_gib < free_below_gib and gpu.total_gib - ours_gib >= free_below_gib


def _what_fired(
    newcomers: Sequence[GpuProcess],
    pressed: bool,
    policy: Policy,
    gpu_uuid: str,
    gpus: Sequence[GpuSnapshot],
) -> tuple[int | None, str] | None:
    """(the largest newcomer's pid, what fired) when a job's GPU has others on it; else None."""
    largest = newcomers[0].pid if newcomers else None
    if policy.on_foreign_process and newcomers:
        return largest, "a process not started by gpuspool"
    if pressed:
        gpu = next(g for g in gpus if g.uuid == gpu_uuid)
        return largest, f"free {gpu.free_gib:.1f} GiB < {policy.free_below_gib:g} GiB"
    return None


def _tolerates(tolerated: Mapping[int, float], proc: GpuProcess) -> bool:
    """Whether ``proc`` was there when the job started and has not grown much since."""
    was = tolerated.get(proc.pid)
    return was is not None and (proc.used_mib or 0.0) - was <= TOLERATED_GROWTH_GIB * 1024.0


class YieldWatch:
    """Per running job, the polls in a row its GPU had others on it; per GPU, when others were
    last seen; per waiting job, the GPUs it yielded on (see the module docstring)."""

    def __init__(self) -> None:
        self._streak: dict[str, int] = {}
        self._others_seen: dict[str, float] = {}
        self._yielded_on: dict[str, dict[str, float]] = {}
        #: Per GPU, the pids not ours at the last poll; per job, those it tolerates. Each with
        #: the MiB it used then.
        self._guests: dict[str, dict[int, float]] = {}
        self._tolerated: dict[str, dict[int, float]] = {}

    def started(self, job_id: str, gpu_uuid: str) -> None:
        """``job_id`` starts on ``gpu_uuid``: what is there now is not a newcomer to it."""
        self._tolerated[job_id] = self._guests.get(gpu_uuid, {})

    def observe(
        self,
        now: float,
        gpus: Sequence[GpuSnapshot],
        jobs: Sequence[OurJob],
        ours: Iterable[int],
        policy: Policy,
    ) -> list[Trigger]:
        """Take one poll; the jobs that should yield now (any job with others on its GPU for
        ``stable_polls`` polls: the caller decides which of them may)."""
        mine = set(ours)
        by_gpu: dict[str, list[OurJob]] = {}
        for job in jobs:
            by_gpu.setdefault(job.gpu_uuid, []).append(job)
        strangers: dict[str, list[GpuProcess]] = {}
        pressed: dict[str, bool] = {}
        for gpu in gpus:
            if not gpu.healthy:
                continue
            strangers[gpu.uuid] = guests(gpu, mine)
            self._guests[gpu.uuid] = {p.pid: p.used_mib or 0.0 for p in strangers[gpu.uuid]}
            ours_gib = sum(j.footprint_gib for j in by_gpu.get(gpu.uuid, []))
            pressed[gpu.uuid] = pressure(gpu, ours_gib, policy.free_below_gib)
            if (policy.on_foreign_process and strangers[gpu.uuid]) or pressed[gpu.uuid]:
                self._others_seen[gpu.uuid] = now
        triggers = []
        streak: dict[str, int] = {}
        index = {g.uuid: g.index for g in gpus}
        for job in jobs:
            if job.gpu_uuid not in strangers:
                continue  # unknown this poll: neither a newcomer nor a reason to forget one
            tolerated = self._tolerated.setdefault(job.job_id, self._guests[job.gpu_uuid])
            newcomers = [p for p in strangers[job.gpu_uuid] if not _tolerates(tolerated, p)]
            found = _what_fired(newcomers, pressed[job.gpu_uuid], policy, job.gpu_uuid, gpus)
            if found is None:
                continue
            streak[job.job_id] = self._streak.get(job.job_id, 0) + 1
            if streak[job.job_id] >= policy.stable_polls:
                pid, why = found
                gpu_index = index.get(job.gpu_uuid, -1)
                triggers.append(Trigger(job.job_id, job.gpu_uuid, gpu_index, pid, why))
        self._streak = streak
        running = {j.job_id for j in jobs}
        self._tolerated = {k: v for k, v in self._tolerated.items() if k in running}
        return triggers

    def yielded(self, job_id: str, gpu_uuid: str, now: float) -> None:
        """``job_id`` stepped aside on ``gpu_uuid`` at ``now``: it skips that GPU for now."""
        self._yielded_on.setdefault(job_id, {})[gpu_uuid] = now
        self._others_seen[gpu_uuid] = max(now, self._others_seen.get(gpu_uuid, now))
        self._streak.pop(job_id, None)

    def tolerated(self, job_id: str) -> frozenset[int]:
        """The pids that were on the job's GPU when it started (they make it yield only once
        they grow by more than :data:`TOLERATED_GROWTH_GIB`)."""
        return frozenset(self._tolerated.get(job_id, {}))

    def forget(self, job_id: str) -> None:
        """The job is finished: nothing to skip any more."""
        self._yielded_on.pop(job_id, None)
        self._streak.pop(job_id, None)

    def cooling(self, now: float, cooldown_s: float) -> dict[str, dict[str, float]]:
        """Job id → {GPU it must skip now: seconds left}, for every job that yielded on a GPU
        that has not been free of others for ``cooldown_s`` yet (a GPU whose cool-down is over
        is forgotten)."""
        out: dict[str, dict[str, float]] = {}
        for job_id, gpus in list(self._yielded_on.items()):
            for uuid, at in list(gpus.items()):
                left = max(at, self._others_seen.get(uuid, at)) + cooldown_s - now
                if left > 0:
                    out.setdefault(job_id, {})[uuid] = left
                else:
                    del gpus[uuid]
            if not gpus:
                del self._yielded_on[job_id]
        return out

    @property
    def waiting_jobs(self) -> Mapping[str, Mapping[str, float]]:
        """Job id → {GPU: when it yielded there} (for tests and ``describe``)."""
        return self._yielded_on


def yield_words(who: dict[str, Any], *, with_time: bool = True) -> str:
    """A yield in words: "pid 4242 (user ann) on GPU 0 (GPU-8f…)" and, ``with_time``, "at T"
    (status and the job's history say it this way)."""
    pid = who.get("pid")
    user = who.get("user") or "unknown"
    if pid is None:
        target = f"others' processes ({who.get('why') or 'free memory low'})"
    else:
        target = f"pid {pid} (user {user})"
    index = who.get("gpu_index")
    gpu = f"GPU {index}" if isinstance(index, int) and index >= 0 else "GPU"
    uuid = who.get("gpu_uuid")
    where = f"{gpu} ({uuid})" if uuid else gpu
    text = f"{target} on {where}"
    at = who.get("at")
    if with_time and isinstance(at, int | float):
        text += f" at {iso_timestamp(float(at))}"
    return text
