"""GPU observation: what each GPU showed at the last polls, and what running jobs still reserve.

One small class, fed one ``ProbeResult`` per tick with the running jobs, so placement gets
``GpuView``s without the daemon keeping per-GPU state itself. No I/O here: the ledger's GPU
history is written by the caller when :meth:`GpuObserver.history_due` says so.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any, Protocol

from gpuspool import logs
from gpuspool.gpus import ProbeResult
from gpuspool.models import GpuSnapshot
from gpuspool.placement import GpuView

#: How often (seconds) a poll of GPU memory is written to the ledger's history.
HISTORY_EVERY_S = 10.0
#: How long GPU history is kept.
HISTORY_KEEP_S = 7 * 24 * 3600.0
#: How often (seconds) history older than ``HISTORY_KEEP_S`` is pruned.
PRUNE_EVERY_S = 3600.0


class RunningJob(Protocol):
    """What a reservation needs of a running job (a ``JobRecord`` has it)."""

    @property
    def gpu_uuid(self) -> str | None: ...

    @property
    def pid(self) -> int | None: ...

    @property
    def need_gib(self) -> float: ...


def reservations(running: Iterable[RunningJob], gpus: Iterable[GpuSnapshot]) -> dict[str, float]:
    """GiB still reserved per GPU: each job's need less what NVML shows its process using, so two
    jobs never start on the same free memory and a reservation fades as the job's memory shows."""
    used_by_pid = {(g.uuid, p.pid): (p.used_mib or 0.0) / 1024.0 for g in gpus for p in g.processes}
    reserved: dict[str, float] = {}
    for job in running:
        if job.gpu_uuid is None:
            continue
        shown = used_by_pid.get((job.gpu_uuid, job.pid or -1), 0.0)
        reserved[job.gpu_uuid] = reserved.get(job.gpu_uuid, 0.0) + max(0.0, job.need_gib - shown)
    return reserved


class GpuObserver:
    """The last ``stable_polls`` values of ``free − reserved`` per GPU, and the last poll.

    A GPU that is unhealthy contributes ``None`` (unknown, never free); a GPU gone from the
    listing forgets its history. Errors are logged once when they start and once when they end.
    """

    def __init__(self, stable_polls: int) -> None:
        self.stable_polls = stable_polls
        self.gpus: tuple[GpuSnapshot, ...] = ()
        self.probe_error: str | None = None
        self.reserved: dict[str, float] = {}
        self._history: dict[str, deque[float | None]] = {}
        self._gpu_errors: dict[str, str] = {}
        self._last_history_at = float("-inf")
        self._last_prune = float("-inf")
        self._log = logs.get()

    def observe(self, result: ProbeResult, running: Iterable[RunningJob]) -> None:
        """Take one poll: the GPUs, their errors, and the running jobs' reservations."""
        self._note_probe_error(result.error)
        self.gpus = result.gpus
        self.reserved = reservations(running, result.gpus)
        seen = set()
        for gpu in result.gpus:
            seen.add(gpu.uuid)
            hist = self._history.get(gpu.uuid)
            if hist is None or hist.maxlen != self.stable_polls:
                hist = deque(hist or (), maxlen=self.stable_polls)
                self._history[gpu.uuid] = hist
            hist.append(gpu.free_gib - self.reserved.get(gpu.uuid, 0.0) if gpu.healthy else None)
            self._note_gpu_error(gpu)
        for uuid in list(self._history):
            if uuid not in seen:  # a GPU gone from the listing: forget its stability
                del self._history[uuid]

    def _note_probe_error(self, error: str | None) -> None:
        if error != self.probe_error:
            if error:
                self._log.error("gpu_probe_error", error=error)
            else:
                self._log.info("gpu_probe_recovered")
            self.probe_error = error

    def _note_gpu_error(self, gpu: GpuSnapshot) -> None:
        previous = self._gpu_errors.get(gpu.uuid)
        if not gpu.healthy and previous != gpu.error:
            self._gpu_errors[gpu.uuid] = gpu.error or "unknown"
            self._log.error("gpu_error", gpu_uuid=gpu.uuid, index=gpu.index, error=gpu.error)
        elif gpu.healthy and previous is not None:
            del self._gpu_errors[gpu.uuid]
            self._log.info("gpu_recovered", gpu_uuid=gpu.uuid, index=gpu.index)

    def views(self) -> list[GpuView]:
        """What placement needs of each GPU seen at the last poll."""
        return [
            GpuView(g, tuple(self._history.get(g.uuid, ())), self.reserved.get(g.uuid, 0.0))
            for g in self.gpus
        ]

    def describe(self) -> list[dict[str, Any]]:
        """Each GPU with its stability and reservations (``gpuspool gpus``, metrics, snapshot)."""
        out = []
        for view in self.views():
            snap = view.snapshot
            out.append(
                {
                    "index": snap.index,
                    "uuid": snap.uuid,
                    "name": snap.name,
                    "free_mib": snap.free_mib,
                    "total_mib": snap.total_mib,
                    "healthy": snap.healthy,
                    "error": snap.error,
                    "reserved_gib": round(view.reserved_gib, 2),
                    "history": list(view.available_history),
                    "processes": [{"pid": p.pid, "used_mib": p.used_mib} for p in snap.processes],
                }
            )
        return out

    def history_rows(self, now: float) -> list[tuple[str, float | None, float]] | None:
        """The rows of GPU history to record at ``now`` (every ``HISTORY_EVERY_S``), else None.
        An unreadable GPU is recorded as a gap (free None), never as zero."""
        if now - self._last_history_at < HISTORY_EVERY_S or not self.gpus:
            return None
        self._last_history_at = now
        return [(g.uuid, g.free_mib if g.healthy else None, g.total_mib) for g in self.gpus]

    def prune_before(self, now: float) -> float | None:
        """The time before which history may go, once every ``PRUNE_EVERY_S``; else None."""
        if now - self._last_prune < PRUNE_EVERY_S:
            return None
        self._last_prune = now
        return now - HISTORY_KEEP_S
