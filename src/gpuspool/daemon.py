"""The daemon's logic: ``tick(now)`` = collect scans → reap → probe → place → launch → intake.

No real clock and no ``os.environ`` here: ``now`` comes from the caller (the scheduler, or a test
with fake time) and the process environment is handed in. The service loop around it (signals,
scheduler, systemd) lives in ``service.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar, cast

from gpuspool import __version__, logs
from gpuspool.config import Settings
from gpuspool.exitcodes import ExitClass, ExitCode
from gpuspool.fairshare import UsageTracker, UserLimits, UserState
from gpuspool.gpus import GpuProbe, ProbeResult
from gpuspool.intake import Intake
from gpuspool.ledger import FencedOut, JobRecord, LedgerError, Waiting
from gpuspool.ledger_api import ClusterLedger, LedgerBackend
from gpuspool.models import RUNNABLE_STATES, JobState
from gpuspool.observe import GpuObserver
from gpuspool.outcome import NO_INPUT_PREFIX, ExitFacts, Outcome, StopReason, decide, exit_code
from gpuspool.placement import FAR, Candidate, Decision, GpuView, place
from gpuspool.protocol import (
    FENCE_ENV,
    GO_KEYS,
    HOST_ENV,
    ErrorEvent,
    ProgressEvent,
    StartEvent,
    SummaryEvent,
    WorkerEvent,
    encode_go,
    parse_events,
    partial_path,
)
from gpuspool.runner import JOB_ID_ENV, Exit, Launch, Runner, Started
from gpuspool.spool import Spool
from gpuspool.yielding import OurJob, Policy, Trigger, YieldWatch, yield_words

#: Longest stretch of a job's events file read in one tick; a flooding worker is skipped ahead.
MAX_EVENTS_READ = 1 << 20
#: What start-up reads of the events of a job whose process is gone: the end of the file.
EVENTS_TAIL = 1 << 16
#: An events file past this size (a flooding worker) is emptied once read: the state folder's
#: disk is the daemon's, not the job's. A well-behaved worker writes ~60 bytes a second.
MAX_EVENTS_FILE = 16 << 20
#: A job's environment when the daemon's has no PATH.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Per tick, waiting-reason changes logged one by one; the rest are summed up in one event.
MAX_WAITING_EVENTS = 50
#: How long a job process stays "ours" after it was filed as gone: NVML may still list it for a
#: poll while its context is torn down, and it must not look like another user's newcomer.
RECENT_PID_S = 10.0
#: A waiting reason whose only change is the GPU it names and its GiB figures (the closest GPU's
#: free memory moves at nearly every poll of a busy GPU) is written and logged at most this
#: often; otherwise each poll would rewrite every waiting job's row: 10,000 rows a tick with a
#: long queue, longer than the tick itself on a shared ledger.
REASON_FIGURES_EVERY_S = 30.0
#: The parts of a waiting reason that :data:`REASON_FIGURES_EVERY_S` holds back.
_REASON_FIGURES = re.compile(r"GPU \d+ \([^)]*\)|\d+\.\d+")

#: Added to the waiting reason of a job whose worker waits at its gate (``prestart``), so that
#: ``gpuspool show`` explains the user's process that runs before the job does.
PRESTARTED_NOTE = "; its worker is already importing (prestart)"

_T = TypeVar("_T")
#: The distance (``placement.Decision.distance``) of a waiting reason shown before any host's
#: memory figures on a shared ledger: this host did not find the job's input (the user must
#: know; the reason says the job waits for another host).
FIRST = float("-inf")
#: Shared ledger unreachable: the first retry after this many seconds, doubling up to the most.
OUTAGE_BACKOFF_S = 1.0
OUTAGE_BACKOFF_MAX_S = 30.0
#: ``prestart``: a worker waiting at its gate this long is stopped, and its job is not prestarted
#: again while it waits: a GPU settles in ``stable_polls`` polls, and a worker holds host memory.
PRESTART_MAX_WAIT_S = 120.0


@dataclass(frozen=True, slots=True)
class _Prestarted:
    """The worker started for a waiting job before its GPU was free (``prestart``)."""

    job_id: str
    pid: int
    pid_start: float
    launch: Launch
    at: float
    #: Its scratch folder was made for it (not left by an earlier attempt of its job).
    made_scratch: bool


@dataclass
class _Running:
    """What the daemon tracks in memory about a running job."""

    events_offset: int = 0
    last_progress_log: float = float("-inf")
    stop_deadline: float | None = None
    stop: StopReason | None = None
    #: The timeout that stopped it (for the reason), when ``stop`` is TIMED_OUT.
    timeout_s: float | None = None
    last_progress: StartEvent | ProgressEvent | None = None
    summary: SummaryEvent | None = None
    error: ErrorEvent | None = None
    #: The process this daemon started or adopted (kept here: on a shared ledger the row may
    #: name another host's process once the job was taken away).
    pid: int | None = None
    pid_start: float | None = None
    #: Shared ledger: the fencing token of the attempt this host runs.
    fence: int | None = None
    #: Whom it is yielding to (pid, user, gpu_uuid, gpu_index, at, why), when ``stop`` is
    #: YIELDED: recorded in the ledger once the process is gone.
    yield_to: dict[str, Any] | None = None

    @property
    def peak_gib(self) -> float | None:
        """The GPU memory peak its worker reported so far (None before the first report)."""
        progress = self.last_progress
        return progress.gpu_peak_gib if isinstance(progress, ProgressEvent) else None

    def take(self, event: WorkerEvent) -> None:
        """Remember the latest event of each kind the daemon acts on."""
        if isinstance(event, SummaryEvent):
            self.summary = event
        elif isinstance(event, ErrorEvent):
            self.error = event
        elif isinstance(event, ProgressEvent) or self.last_progress is None:
            self.last_progress = event


@dataclass
class TickReport:
    """What one tick did (for tests, metrics and systemd STATUS=)."""

    accepted: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    started: list[tuple[str, str]] = field(default_factory=list)
    finished: list[tuple[str, str]] = field(default_factory=list)
    probe_error: str | None = None


class Daemon:
    """One host's queue: owns the ledger, the spool, the probe and the job processes."""

    def __init__(
        self,
        settings: Settings,
        *,
        ledger: LedgerBackend,
        spool: Spool,
        probe: GpuProbe,
        runner: Runner,
        environ: Mapping[str, str],
        daemon_euid: int,
        identity_for: Callable[[int], Any] | None = None,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.spool = spool
        self.probe = probe
        self.runner = runner
        self.environ = environ
        self.daemon_euid = daemon_euid
        self.identity_for = identity_for
        self.log = logs.get()
        self.intake_stage = Intake(self)
        #: The shared ledger's several-host operations; None on SQLite (one host).
        self.cluster: ClusterLedger | None = ledger if isinstance(ledger, ClusterLedger) else None
        #: Processes killed (workers of attempts another host took over, prestarted workers no
        #: longer wanted), reaped here once gone.
        self._killed: list[tuple[int, float | None]] = []
        #: ``prestart``: the worker waiting for its GPU, and the waiting jobs not to prestart
        #: again (their worker stopped by itself, could not start, waited too long or gave way
        #: to a nearer job): they start the usual way.
        self._prestarted: _Prestarted | None = None
        self._no_prestart: set[str] = set()
        #: Shared ledger unreachable since (None: reachable); the next try; the current backoff.
        self._outage_since: float | None = None
        self._outage_retry_at = 0.0
        self._outage_backoff_s = OUTAGE_BACKOFF_S
        #: When the shared ledger last answered a whole tick, and since when without a break:
        #: a host requeues others' jobs only after being connected for ``host_timeout_s``.
        self._ledger_ok_at: float | None = None
        self._connected_since: float | None = None
        self._self_fenced = False
        #: What the GPUs showed at the last polls, and the running jobs' reservations.
        self.observer = GpuObserver(settings.stable_polls)
        #: Polite scavenging: others' processes on our GPUs, and the GPUs yielded jobs skip.
        self.yield_watch = YieldWatch()
        self._unseen_pids_noted = False  # gpu_pids_not_visible logged
        self._yield_limit_noted: set[str] = set()
        #: Pids of job processes filed as gone, and when (see ``RECENT_PID_S``).
        self._recent_pids: dict[int, tuple[str, float]] = {}
        self._reasons: dict[str, str] = {}
        #: Shared ledger: waiting jobs whose input this host did not find (left to the others),
        #: with the reason that said so (kept as their waiting reason here).
        self._no_input_here: dict[str, str] = {}
        self._running: dict[str, _Running] = {}
        self._now = 0.0  # the time of the tick in progress, for events written to job logs
        self._waiting_cache: tuple[tuple[int, int], list[Waiting], list[Candidate]] | None = None
        self._usage: tuple[tuple[int, int], UsageTracker] | None = None
        self._reasons_stale = False
        self._reason_figures_at = float("-inf")
        #: Ledger reads taken once per tick (``_read_once``); emptied by each write of ours.
        self._reads: dict[str, Any] = {}
        self.stopping = False
        self.last_tick_done: float | None = None
        self.last_report = TickReport()
        #: Called with a job's final record when it ends done or failed (e.g. the webhook).
        self.finish_hooks: list[Callable[[JobRecord], None]] = []

    # -- lifecycle ---------------------------------------------------------------------------------

    def startup(self, now: float) -> None:
        """Recover after a restart: adopt live jobs, file those whose process is gone by their
        last events (read from the end of the events file, parsed as untrusted input)."""
        self._now = now
        self._forget_reads()
        self.spool.ensure_dirs()
        self.intake_stage.requeue_lost_now()
        self.settings.logs_dir.mkdir(parents=True, exist_ok=True)
        self.settings.events_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        running = self.running_jobs()
        if self.cluster is None:  # only a job claimed just before a crash can have no pid
            candidates = [job for job in running if job.pid is None]
        else:  # and on a shared ledger, any job this host may have run before it went down
            candidates = self.ledger.jobs()
        uids = self._job_uids(candidates)
        orphans = self.runner.find_job_processes(uids) if uids else {}
        if self.cluster is not None:
            self._kill_stale_workers(running, orphans)
        ended: list[tuple[JobRecord, Exit]] = []
        for job in running:
            if job.pid is None and job.id in orphans:
                # Started just before a crash, before its pid was recorded: adopt, never rerun.
                pid, created = orphans[job.id]
                job = self._write(job, now=now, pid=pid, pid_start=created)
            self._running[job.id] = self._track(job)
            if self.runner.is_alive(job.pid, job.pid_start):
                self.log.info("job_adopted", job_id=job.id, pid=job.pid, gpu_uuid=job.gpu_uuid)
                continue
            self._read_events(job, now, tail=True)
            ended.append((job, Exit(None)))
        self._finish_all(ended, now, None)
        for job in self.ledger.jobs(sorted(RUNNABLE_STATES)):
            # The cool-down of a job that yielded before a restart starts again from its yield.
            last = job.last_yield or {}
            if isinstance(last.get("gpu_uuid"), str) and isinstance(last.get("at"), int | float):
                self.yield_watch.yielded(job.id, last["gpu_uuid"], float(last["at"]))

    def _kill_stale_workers(
        self, owned: list[JobRecord], processes: Mapping[str, tuple[int, float]]
    ) -> None:
        """Start-up on a shared ledger: a worker this host started that outlived its daemon,
        and whose job another host has taken over meanwhile (the daemon was down for longer
        than ``host_timeout_s``), is killed before it writes another line."""
        assert self.cluster is not None
        mine = {j.id for j in owned}
        for job_id, (pid, created) in processes.items():
            if job_id in mine or self.ledger.get(job_id) is None:
                continue
            here = self.cluster.host_name
            trail = self.cluster.audit(job_id)
            if not any(t["host"] == here and t["to_state"] == "running" for t in trail):
                continue  # not a job this host ever ran: not ours to touch
            self._fenced_out(job_id, _Running(pid=pid, pid_start=created))

    def _track(self, job: JobRecord) -> _Running:
        """What to remember of a running job this host owns, as its row says."""
        return _Running(
            pid=job.pid,
            pid_start=job.pid_start,
            fence=job.fence if self.cluster is not None else None,
        )

    def _read_once(self, key: str, read: Callable[[], _T]) -> _T:
        """``read()``, taken once from the start of a tick until this daemon writes to the
        ledger (``_forget_reads``), so the tick and what reads the ledger after it (the status
        line, the metrics) share it. A tick runs on one thread; what another host or the CLI
        writes meanwhile is seen at the next tick, as if it had come a moment later."""
        if key not in self._reads:
            self._reads[key] = read()
        return cast(_T, self._reads[key])

    def _forget_reads(self) -> None:
        self._reads.clear()

    def all_running_jobs(self) -> list[JobRecord]:
        """Every running job (of every host, on a shared ledger)."""
        return self._read_once("running", lambda: self.ledger.jobs([JobState.RUNNING]))

    def counts(self) -> dict[str, int]:
        """The number of jobs in each state (``Ledger.counts``), read once per tick."""
        return self._read_once("counts", self.ledger.counts)

    def running_jobs(self) -> list[JobRecord]:
        """The running jobs this host runs (on a shared ledger, other hosts run the rest)."""
        jobs = self.all_running_jobs()
        if self.cluster is None:
            return jobs
        return [j for j in jobs if j.host == self.cluster.host_name]

    def _write(self, job: JobRecord, *, now: float, **fields: Any) -> JobRecord:
        """Set fields of a running job this host owns: through the fence on a shared ledger
        (``FencedOut`` when another attempt owns it now), a plain write on SQLite."""
        self._forget_reads()
        if self.cluster is None:
            return self.ledger.transition(job.id, JobState.RUNNING, now=now, **fields)
        return self.cluster.fenced_transition(
            job.id, JobState.RUNNING, fence=job.fence, now=now, **fields
        )

    @property
    def draining(self) -> bool:
        return self._read_once("draining", self.ledger.draining)

    def tick(self, now: float) -> TickReport:
        """Everything the daemon does at one poll. Never raises for a job's or a file's fault.

        On a shared ledger that cannot be reached, the tick is skipped (running jobs keep
        running, nothing starts) and retried with backoff; see :meth:`_outage`.
        """
        self._now = now
        report = TickReport()
        self._forget_reads()
        if self._outage_since is not None:
            self._self_fence(now)  # before trying again: a try may block for the I/O timeout
            if now < self._outage_retry_at or not self._reconnected(now):
                return report
        try:
            self._tick(now, report)
        except Exception as exc:
            if self.cluster is None:
                raise
            if not self.cluster.is_connection_error(exc) and self._cluster_reachable():
                raise
            self._outage(now, exc)
            self._self_fence(now)
            return report
        if self.cluster is not None:
            self._ledger_ok_at = now
            if self._connected_since is None:
                self._connected_since = now
        self.last_tick_done = now
        self.last_report = report
        return report

    def _tick(self, now: float, report: TickReport) -> None:
        if self.cluster is not None:
            # First, before anything else: a host that was frozen or cut off stops the workers
            # of the jobs another host has taken over since.
            self._drop_lost(self.running_jobs())
        self._largest_gpu()
        self.intake_stage.collect(now, report)
        self._reads.pop("counts", None)  # intake adds queued jobs, nothing else
        self.reap(now, report)
        result = self.probe.poll()
        self._observe(result, now, report)
        if self.settings.yielding and not self.stopping:
            self._watch_yields(result, now)
        if self.cluster is not None:
            self._heartbeat(now)
        if not self.stopping:
            self._place_and_launch(now, report)
        # New files last: a flood of them takes up to ``intake_max_ms``, and nothing a
        # submitter drops in the spool may come between a GPU reading and the start it allows.
        self.intake_stage.take(now, report)
        self._reads.pop("counts", None)
        self.ledger.set_meta("gpus", json.dumps({"at": now, "gpus": self.describe_gpus()}))

    # -- several hosts -------------------------------------------------------------------------

    def _heartbeat(self, now: float) -> None:
        """Tell the other hosts this one is alive (and what its GPUs show); move the running
        jobs of hosts silent for over ``host_timeout_s`` back to the queue."""
        assert self.cluster is not None
        self.cluster.heartbeat(
            gpus=self.describe_gpus(), version=__version__, draining=self.draining
        )
        timeout = self.settings.host_timeout_s
        if self._connected_since is None or now - self._connected_since < timeout:
            # Just started or back from an outage: the other hosts have had no chance to
            # heartbeat yet, and must not be taken for dead.
            return
        lost = self.cluster.requeue_silent_hosts(timeout_s=timeout, now=now)
        if lost:
            self._forget_reads()
            self.log.warning(
                "jobs_requeued_from_silent_host",
                job_ids=lost,
                host_timeout_s=self.settings.host_timeout_s,
            )

    def _drop_lost(self, owned: list[JobRecord]) -> None:
        """Stop and forget every job this host tracks whose current attempt is not its own any
        more (another host requeued or took it): its worker must not write another line."""
        fences = {j.id: j.fence for j in owned}
        for job_id, state in list(self._running.items()):
            if fences.get(job_id) != state.fence:
                self._fenced_out(job_id, state)
        self._reap_killed()

    def _reap_killed(self) -> None:
        """Reap the processes killed earlier (SIGKILL again while they linger)."""
        still = []
        for pid, start in self._killed:
            if self.runner.poll(pid, start) is None:
                self.runner.kill(pid, start)
                still.append((pid, start))
        self._killed = still

    def _fenced_out(self, job_id: str, state: _Running | None = None) -> None:
        """Another attempt owns ``job_id``: SIGKILL our worker at once (no grace: a worker
        given SIGTERM would checkpoint into the output another host now writes), and forget
        the job without writing anything about it."""
        self._forget_reads()
        state = self._running.pop(job_id, None) or state
        pid = state.pid if state is not None else None
        if pid is not None and state is not None:
            self.runner.kill(pid, state.pid_start)
            self._killed.append((pid, state.pid_start))
        self.log.warning(
            "job_fenced_out",
            job_id=job_id,
            pid=pid,
            fence=state.fence if state is not None else None,
            reason="another host owns this job now; its worker here is stopped",
        )

    @property
    def ledger_unreachable(self) -> bool:
        """Whether the shared ledger is in an outage (the service skips what needs it)."""
        return self._outage_since is not None

    def _self_fence(self, now: float) -> None:
        """Cut off from the shared ledger for over half ``host_timeout_s``: the other hosts will
        soon take this host's jobs over, so kill their workers now, before a second worker can
        start on the same output. Filed as interrupted once the ledger answers (or forgotten,
        if another host owns them by then)."""
        if self._self_fenced or self._ledger_ok_at is None:
            return
        if now - self._ledger_ok_at <= self.settings.host_timeout_s / 2:
            return
        self._self_fenced = True
        killed = []
        for job_id, state in self._running.items():
            if state.pid is not None:
                self.runner.kill(state.pid, state.pid_start)
                state.stop = state.stop or StopReason.DAEMON_STOPPING
                killed.append(job_id)
        if killed:
            self.log.warning(
                "jobs_stopped_ledger_unreachable",
                job_ids=killed,
                unreachable_s=round(now - self._ledger_ok_at, 1),
                host_timeout_s=self.settings.host_timeout_s,
            )

    def _cluster_reachable(self) -> bool:
        assert self.cluster is not None
        return self.cluster.ping()

    def _outage(self, now: float, exc: BaseException) -> None:
        """The shared ledger stopped answering: keep the running jobs, start nothing, retry
        after a backoff that doubles up to ``OUTAGE_BACKOFF_MAX_S``; log it once."""
        if self._outage_since is None:
            self._outage_since = now
            self._outage_backoff_s = OUTAGE_BACKOFF_S
            self.log.error(
                "ledger_unreachable",
                error=_describe(exc),
                running_jobs=len(self._running),
                ledger=self.settings.ledger_shown,
            )
        else:
            self._outage_backoff_s = min(self._outage_backoff_s * 2, OUTAGE_BACKOFF_MAX_S)
        self._outage_retry_at = now + self._outage_backoff_s

    def _reconnected(self, now: float) -> bool:
        """Whether the shared ledger answers again (logged once); else back off further."""
        if not self._cluster_reachable():
            self._outage(now, ConnectionError("still unreachable"))
            return False
        assert self._outage_since is not None
        self.log.info("ledger_reconnected", down_s=round(now - self._outage_since, 1))
        self._outage_since = None
        self._connected_since = now
        self._self_fenced = False
        self._waiting_cache = None
        self._reasons_stale = True
        return True

    def stop_all(self, now: float, *, hard: bool = False) -> None:
        """Stop every running job (SIGTERM, or SIGKILL when ``hard``); they resume later.
        Running scans are killed: their files stay in ``incoming/`` for the next start."""
        self.stopping = True
        self.intake_stage.close()
        self._forget_reads()
        self._dismiss("the daemon is stopping")
        for job in self.running_jobs():
            if job.pid is None:
                continue
            state = self._running.setdefault(job.id, self._track(job))
            state.stop = state.stop or StopReason.DAEMON_STOPPING
            if hard:
                self.runner.kill(job.pid, job.pid_start)
            else:
                self.runner.terminate(job.pid, job.pid_start)
                state.stop_deadline = now + self.settings.stop_grace_s

    def running_count(self) -> int:
        if self.cluster is not None:
            return len(self.running_jobs())
        return self.counts().get(JobState.RUNNING.value, 0)

    # -- intake ------------------------------------------------------------------------------------

    def intake(self, now: float, report: TickReport) -> None:
        """The whole intake stage (``intake.py``) at once: never waits on a scan, bounded."""
        self._largest_gpu()
        self.intake_stage.run(now, report)

    def _largest_gpu(self) -> None:
        """Tell intake the largest GPU seen, which caps a job's estimated need."""
        totals = [g.total_gib for g in self.observer.gpus]
        if totals:
            largest = max(totals)
            known = self.intake_stage.largest_gpu_gib
            self.intake_stage.largest_gpu_gib = largest if known is None else max(known, largest)

    # -- running jobs ------------------------------------------------------------------------------

    def reap(self, now: float, report: TickReport) -> None:
        self._now = now
        self._reap_killed()
        ended: list[tuple[JobRecord, Exit]] = []
        try:
            self._poll_running(now, ended)
        finally:  # a job whose exit was already taken is filed even if a later one failed
            self._finish_all(ended, now, report)

    def _finish_all(
        self, ended: list[tuple[JobRecord, Exit]], now: float, report: TickReport | None
    ) -> None:
        """File the jobs whose process is gone, after killing their stray processes in one pass
        over the process table for all of them (``Runner.kill_leftovers``)."""
        if not ended:
            return
        uids = {job.id: uid for job, _ in ended if (uid := self._job_uid(job)) is not None}
        strays = self.runner.kill_leftovers(uids)
        for job, gone in ended:
            self._finish(job, gone, now, report, strays=strays.get(job.id, []))

    def _poll_running(self, now: float, ended: list[tuple[JobRecord, Exit]]) -> None:
        """Look at each running job: pid, progress, exit, cancel, timeout, stop deadline. The
        jobs whose process is gone are added to ``ended`` (filed together by ``reap``)."""
        for job in self.running_jobs():
            state = self._running.setdefault(job.id, self._track(job))
            if job.pid is None and state.pid is not None:
                # Started, but the ledger went away before the pid was written: write it now.
                try:
                    job = self._write(job, now=now, pid=state.pid, pid_start=state.pid_start)
                except FencedOut:
                    self._fenced_out(job.id)
                    continue
            self._read_events(job, now)
            if job.id not in self._running:  # fenced out while its progress was written
                continue
            if job.pid is None:
                ended.append((job, Exit(None)))
                continue
            gone = self.runner.poll(job.pid, job.pid_start)
            if gone is not None:
                ended.append((job, gone))
                continue
            if job.cancel_requested and state.stop is None:
                self._stop(job, state, StopReason.CANCELLED, now)
            timeout = self._timeout_s(job)
            if (
                timeout is not None
                and state.stop is None
                and job.started_at is not None
                and now - job.started_at > timeout
            ):
                state.timeout_s = timeout
                self._stop(job, state, StopReason.TIMED_OUT, now)
            if state.stop_deadline is not None and now >= state.stop_deadline:
                self.runner.kill(job.pid, job.pid_start)
                state.stop_deadline = None

    def _timeout_s(self, job: JobRecord) -> float | None:
        try:
            own = job.spec.timeout_s
        except ValueError:  # a row written by an older version that this one's schema refuses
            own = None
        return own or self.settings.job_timeout_s

    def _stop(
        self, job: JobRecord, state: _Running, why: StopReason, now: float, detail: str = ""
    ) -> None:
        """SIGTERM the job's group now, SIGKILL after ``stop_grace_s`` (in ``reap``)."""
        assert job.pid is not None
        state.stop = why
        state.stop_deadline = now + self.settings.stop_grace_s
        self.runner.terminate(job.pid, job.pid_start)
        reason = why.value
        if why == StopReason.TIMED_OUT and state.timeout_s is not None:
            reason = f"timed out after {state.timeout_s:.0f} s"
        if detail:
            reason = f"{reason}: {detail}"
        self._job_event(job, "job_stopping", reason=reason)

    def events_path(self, job_id: str) -> Path:
        """The job's events file (the worker → daemon channel; see gpuspool.protocol)."""
        return self.settings.events_dir / f"{job_id}.events"

    def _read_events(self, job: JobRecord, now: float, *, tail: bool = False) -> None:
        """Take the worker's new events from its events file (bounded per tick); relay progress.

        Only complete lines are read; each is validated by :func:`gpuspool.protocol.parse_event`
        and anything else is skipped. ``tail``: read only the end (start-up, process gone).
        """
        state = self._running.setdefault(job.id, _Running())
        try:
            with open(self.events_path(job.id), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < state.events_offset:  # truncated: a new run of the job
                    state.events_offset = 0
                if size - state.events_offset > (EVENTS_TAIL if tail else MAX_EVENTS_READ):
                    state.events_offset = size - EVENTS_TAIL  # skip a flood, keep the latest
                f.seek(state.events_offset)
                chunk = f.read(MAX_EVENTS_READ)
                flooded = size > MAX_EVENTS_FILE and not tail
                if flooded:  # the worker appends, so it goes on writing from 0
                    os.truncate(self.events_path(job.id), 0)
        except OSError:
            return
        end = chunk.rfind(b"\n")
        state.events_offset = 0 if flooded else state.events_offset + end + 1
        if end < 0:
            return
        for event in parse_events(chunk[: end + 1]):
            state.take(event)
        if state.last_progress is None:
            return
        fields = state.last_progress.fields()
        if fields != job.progress:
            try:
                self._update(job, now=now, progress=fields)
            except FencedOut:
                self._fenced_out(job.id)
                return
            if now - state.last_progress_log >= self.settings.progress_log_interval_s:
                state.last_progress_log = now
                self.log.info("job_progress", job_id=job.id, gpu_uuid=job.gpu_uuid, **fields)

    def _finish(
        self,
        job: JobRecord,
        gone: Exit,
        now: float,
        report: TickReport | None,
        *,
        strays: list[int],
    ) -> None:
        """File a job whose process is gone: gather the facts, :func:`decide`, apply.
        ``strays``: its leftover processes, already killed (``_finish_all``)."""
        state = self._running.pop(job.id, _Running())
        if state.pid is not None:
            self._recent_pids[state.pid] = (job.id, now)
        if strays:
            self.log.warning("job_strays_killed", job_id=job.id, pids=strays)
        facts = ExitFacts(
            returncode=gone.returncode,
            attempts=job.attempts,
            max_attempts=self._max_attempts(job),
            retry_backoff_s=self.settings.retry_backoff_s,
            now=now,
            error=state.error,
            summary=state.summary,
            stop=state.stop,
            timeout_s=state.timeout_s,
            cancel_requested=job.cancel_requested,
            yielded_to=yield_words(state.yield_to, with_time=False) if state.yield_to else None,
        )
        code = exit_code(facts)
        if code in (0, ExitCode.OUTPUT_EXISTS):
            output, partial = self._output_files(job)
            facts = replace(facts, output_exists=output)
            if code == ExitCode.OUTPUT_EXISTS:
                earlier = output and not partial and self._run_before(job)
                facts = replace(facts, finished_by_earlier_run=earlier)
        if code == ExitCode.NO_INPUT and self.cluster is not None:
            facts = self._no_input_facts(job, facts)
        outcome = decide(facts)
        if outcome.exit_class == ExitClass.NO_INPUT and not outcome.final:
            self._no_input_here[job.id] = outcome.reason
        self._apply(job, outcome, state, now)
        if outcome.final:
            self.runner.remove_scratch(self.scratch_path(job.id))
            self.yield_watch.forget(job.id)
            self._yield_limit_noted.discard(job.id)
        if report is not None:
            report.finished.append((job.id, outcome.exit_class))

    def _no_input_facts(self, job: JobRecord, facts: ExitFacts) -> ExitFacts:
        """Shared ledger, the worker did not find the input here: which hosts did not find it
        before (the audit trail) and which live hosts may still try (their heartbeats; a
        draining host counts: it takes jobs again once resumed)."""
        assert self.cluster is not None
        before = frozenset(
            str(t["host"])
            for t in self.cluster.audit(job.id)
            if str(t.get("detail") or "").startswith(NO_INPUT_PREFIX) and t.get("host")
        )
        try:
            allowed = job.spec.hosts or None
        except ValueError:  # a row written by an older version that this one's schema refuses
            allowed = None
        live = frozenset(
            h.name
            for h in self.cluster.hosts()
            if h.age_s <= self.settings.host_timeout_s and (allowed is None or h.name in allowed)
        )
        return replace(
            facts, host=self.cluster.host_name, no_input_hosts=before, eligible_hosts=live
        )

    def _job_uids(self, jobs: list[JobRecord]) -> dict[str, int]:
        """Job id → the uid its processes run as, for the jobs whose user still exists."""
        by_submitter: dict[int, int | None] = {}
        out: dict[str, int] = {}
        for job in jobs:
            if job.submitter_uid not in by_submitter:
                by_submitter[job.submitter_uid] = self._job_uid(job)
            uid = by_submitter[job.submitter_uid]
            if uid is not None:
                out[job.id] = uid
        return out

    def _job_uid(self, job: JobRecord) -> int | None:
        """The uid a job's processes run as (None: its user has no account any more). Only a
        process of that uid can be the job's: job ids are public, environments are not proof."""
        if self.identity_for is None:
            return self.daemon_euid
        try:
            return int(self.identity_for(job.submitter_uid).uid)
        except Exception:
            return None

    def _max_attempts(self, job: JobRecord) -> int:
        try:
            own = job.spec.max_attempts
        except ValueError:
            own = None
        return own or self.settings.max_attempts

    def _apply(self, job: JobRecord, outcome: Outcome, state: _Running, now: float) -> None:
        """Record ``outcome`` in the ledger and announce it in the logs."""
        fields: dict[str, Any] = {"pid": None, "pid_start": None, "exit_class": outcome.exit_class}
        if outcome.peak_gib is not None:
            fields["peak_gib"] = outcome.peak_gib
        if outcome.final:
            fields["finished_at"] = now
        if outcome.attempts is not None:
            fields["attempts"] = outcome.attempts
        if outcome.not_before is not None:
            fields["not_before"] = outcome.not_before
        if outcome.yielded and state.yield_to is not None:
            fields["yields"] = job.yields + 1
            fields["last_yield_json"] = json.dumps(state.yield_to)
        summary = state.summary.fields() if state.summary is not None else {}
        if outcome.state == JobState.DONE and summary:
            final = {**job.progress, **summary}
            final["lines_total"] = final.get("lines_total") or summary.get("lines_done")
            try:
                self._update(job, now=now, progress=final)
            except FencedOut:
                self._fenced_out(job.id, state)
                return
        self._move(job, outcome.state, now, outcome.reason, **fields)
        extra: dict[str, Any] = {}
        if outcome.event == "job_finished":
            extra = {"summary": summary, "peak_gib": outcome.peak_gib}
        elif outcome.event == "job_failed":
            extra = {"reason": outcome.reason, "exit_class": outcome.exit_class}
        elif outcome.event == "job_retry_scheduled":
            extra = {"reason": outcome.reason, "retry_in_s": outcome.retry_in_s}
        elif outcome.event == "job_interrupted":
            extra = {"reason": outcome.reason}
        elif outcome.event == "job_yielded" and state.yield_to is not None:
            extra = self._yielded(job, state.yield_to, now)
        self._job_event(job, outcome.event, **extra)

    def _yielded(self, job: JobRecord, who: dict[str, Any], now: float) -> dict[str, Any]:
        """Note a yield (the job skips that GPU for its cool-down); the ``job_yielded`` fields."""
        self.yield_watch.yielded(job.id, who["gpu_uuid"], now)
        return {
            "reason": f"yielded to {yield_words(who, with_time=False)}",
            "pid": who["pid"],
            "user": who["user"],
            "gpu_index": who["gpu_index"],
            "why": who["why"],
            "yields": job.yields + 1,
            "stopped_in_s": round(now - float(who["at"]), 3),
            "cooldown_s": self.settings.yield_cooldown_s,
        }

    def _output_files(self, job: JobRecord) -> tuple[bool, bool]:
        """Whether the job's output and its partial file are regular files, as the job's user
        sees them: the output folder is the user's, so root does not look there itself (a
        link swapped in would make the daemon an oracle for another user's files)."""
        paths = [Path(job.output), partial_path(job.output)]
        answer = None
        if self.identity_for is not None:
            from gpuspool import privileges

            try:
                answer = privileges.regular_files_as(self.identity_for(job.submitter_uid), paths)
            except Exception:
                answer = None
        else:
            answer = [p.is_file() for p in paths]
        if answer is None:  # cannot tell: trust the exit code, never declare a stranger's file ours
            return True, True
        return answer[0], answer[1]

    def _run_before(self, job: JobRecord) -> bool:
        """An earlier run of this job renamed its complete output into place, then was killed
        before it said so; the rerun then finds the output (exit 73). Intake made sure the output
        did not exist and no other job claims it, so a complete output with no partial left,
        after a second start, is ours."""
        runs = [t for t in self.ledger.transitions(job.id) if t["to_state"] == "running"]
        return len(runs) >= 2

    def _update(self, job: JobRecord, *, now: float, **fields: Any) -> None:
        """Set a running job's progress or peak: through the fence on a shared ledger."""
        self._forget_reads()
        if self.cluster is None or job.state != JobState.RUNNING:
            self.ledger.update(job.id, now=now, **fields)
        else:
            self.cluster.fenced_update(job.id, fence=job.fence, now=now, **fields)

    def _move(
        self, job: JobRecord, to: JobState, now: float, reason: str, **fields: Any
    ) -> JobRecord | None:
        """Move a job on from the state it was read in; a job that ends done or failed is handed
        to each ``finish_hooks`` entry (webhooks). None if the job had moved on meanwhile.

        On a shared ledger a running job moves only through its attempt's fence: a host that
        lost the job stops its worker and writes nothing (``FencedOut``)."""
        self._forget_reads()
        try:
            if self.cluster is not None and job.state == JobState.RUNNING:
                moved = self.cluster.fenced_transition(
                    job.id, to, fence=job.fence, now=now, expect=[job.state], detail=reason,
                    reason=reason, **fields,
                )  # fmt: skip
            else:
                moved = self.ledger.transition(
                    job.id, to, now=now, expect=[job.state], detail=reason, reason=reason,
                    **fields,
                )  # fmt: skip
        except FencedOut:
            self._fenced_out(job.id)
            return None
        except LedgerError as exc:
            self.log.warning("job_transition_skipped", job_id=job.id, to=to.value, error=str(exc))
            return None
        if to in (JobState.DONE, JobState.FAILED):
            for hook in self.finish_hooks:
                try:
                    hook(moved)
                except Exception:
                    self.log.exception("finish_hook_failed", job_id=job.id, state=to.value)
        return moved

    def _job_event(self, job: JobRecord, event: str, **fields: Any) -> None:
        """Log an event for a job, to the daemon's log and to the job's own log file."""
        fields = {"job_id": job.id, "gpu_uuid": job.gpu_uuid, **fields}
        self.log.info(event, **fields)
        if job.log_path:
            line = {
                "event": event,
                "source": "daemon",
                "timestamp": logs.iso_timestamp(self._now),
                **fields,
            }
            try:
                with open(job.log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(line, default=str) + "\n")
            except OSError:
                pass

    # -- GPUs and placement ---------------------------------------------------------------------

    def _observe(self, result: ProbeResult, now: float, report: TickReport) -> None:
        """Hand the poll to the observer; record GPU history in the ledger when it is due."""
        self.observer.stable_polls = self.settings.stable_polls
        self.observer.observe(result, [self._reserving(job) for job in self.running_jobs()])
        report.probe_error = result.error
        rows = self.observer.history_rows(now)
        if rows is not None:
            older = self.observer.prune_before(now)
            if older is not None:
                self.ledger.prune_gpu_history(older)
            self.ledger.record_gpu_history(now, rows)

    def _reserving(self, job: JobRecord) -> JobRecord:
        """The job as its reservation sees it: once its worker reported its peak, that figure
        replaces the estimated need, so the rest of the card is offered to others."""
        return replace(job, need_gib=self._held_gib(job))

    def _held_gib(self, job: JobRecord) -> float:
        """The GiB a running job holds at most: its estimated need, lowered to the peak its
        worker reported. The peak only ever lowers it: the job's process is its user's to
        forge, and a peak of 10^15 GiB would reserve the whole card for as long as it ran."""
        state = self._running.get(job.id)
        peak = state.peak_gib if state is not None else None
        return job.need_gib if peak is None else min(peak, job.need_gib)

    # -- polite scavenging ------------------------------------------------------------------------

    def _yield_policy(self) -> Policy:
        s = self.settings
        return Policy(
            s.yield_on_foreign_process, s.yield_when_free_below_gib, s.stable_polls,
            s.yield_cooldown_s,
        )  # fmt: skip

    def _watch_yields(self, result: ProbeResult, now: float) -> None:
        """Stop the running jobs whose GPU had another user's process on it (or had its free
        memory kept under ``yield_when_free_below_gib`` by others) for ``stable_polls`` polls."""
        running = {j.id: j for j in self.running_jobs() if j.gpu_uuid is not None}
        self._recent_pids = {
            pid: (job_id, at)
            for pid, (job_id, at) in self._recent_pids.items()
            if now - at < RECENT_PID_S
        }
        roots = {pid: job_id for pid, (job_id, _) in self._recent_pids.items()}
        roots.update({s.pid: job_id for job_id, s in self._running.items() if s.pid is not None})
        on_gpus = {p.pid for g in result.gpus for p in g.processes}
        ours = self.runner.belonging(on_gpus, roots) if on_gpus and roots else {}
        self._not_strangers(on_gpus, ours)
        used: dict[str, float] = {}
        for gpu in result.gpus:
            for proc in gpu.processes:
                job_id = roots.get(ours.get(proc.pid, -1))
                if job_id is not None:
                    used[job_id] = used.get(job_id, 0.0) + (proc.used_mib or 0.0) / 1024.0
        jobs = []
        for job in running.values():
            footprint = max(self._held_gib(job), used.get(job.id, 0.0))
            jobs.append(OurJob(job.id, job.gpu_uuid or "", footprint))
        policy = self._yield_policy()
        for trigger in self.yield_watch.observe(now, result.gpus, jobs, ours, policy):
            job = running[trigger.job_id]
            state = self._running.get(job.id)
            if state is not None and state.stop is None and job.pid is not None:
                self._maybe_yield(job, state, trigger, now)

    def _not_strangers(self, on_gpus: set[int], ours: dict[int, int]) -> None:
        """A pid NVML lists but this daemon cannot see is nobody's stranger: in a container
        without the host's pid namespace NVML gives host pids, and one of them is the job's own
        worker, which must not make it yield to itself. Such pids go into ``ours`` (under no
        job), so only the free-memory rule can see them; logged once."""
        unseen = {p for p in on_gpus if p not in ours and self.runner.user_of(p) is None}
        for pid in unseen:
            ours[pid] = -1
        if unseen and not self._unseen_pids_noted:
            self._unseen_pids_noted = True
            self.log.warning(
                "gpu_pids_not_visible", pids=sorted(unseen)[:8],
                detail="NVML lists processes this daemon cannot see (ended since NVML listed"
                " them, or no host pid namespace?): they are never taken for a stranger's"
                " process; if this repeats at every start, yield_on_foreign_process needs the"
                " daemon in the host's pid namespace",
            )  # fmt: skip

    def _maybe_yield(self, job: JobRecord, state: _Running, trigger: Trigger, now: float) -> None:
        """Yield, unless the job opted out (``yield = false``) or used up ``max_yields``."""
        try:
            wants = job.spec.yield_
        except ValueError:  # a row an older version wrote that this schema refuses
            wants = True
        if not wants:
            return
        who = self._yield_target(trigger, now)
        if job.yields >= self.settings.max_yields:
            self._yield_limit(job, who, now)
            return
        state.yield_to = who
        self._stop(job, state, StopReason.YIELDED, now, detail=yield_words(who, with_time=False))

    def _yield_target(self, trigger: Trigger, now: float) -> dict[str, Any]:
        """Whom a job yields to: the process's pid and its user (by uid only: everything else
        about a process is its own to forge), the GPU, the time and what fired."""
        user = self.runner.user_of(trigger.pid) if trigger.pid is not None else None
        return {
            "pid": trigger.pid,
            "user": user,
            "gpu_uuid": trigger.gpu_uuid,
            "gpu_index": trigger.gpu_index,
            "at": now,
            "why": trigger.why,
        }

    def _yield_limit(self, job: JobRecord, who: dict[str, Any], now: float) -> None:
        """The job has yielded ``max_yields`` times: it keeps running, and says so once."""
        if job.id in self._yield_limit_noted:
            return
        self._yield_limit_noted.add(job.id)
        limit = self.settings.max_yields
        reason = (
            f"running on {job.gpu_uuid}; yielded {job.yields} time{'' if job.yields == 1 else 's'}"
            f" (max_yields {limit}):"
            f" no longer yields, though {yield_words(who, with_time=False)} wants the GPU"
        )
        self._job_event(
            job, "job_yield_limit_reached", yields=job.yields, max_yields=limit,
            pid=who["pid"], user=who["user"], reason=reason,
        )  # fmt: skip
        try:
            self._update(job, now=now, reason=reason)
        except FencedOut:
            self._fenced_out(job.id)

    def _cooling(self, now: float) -> dict[str, dict[str, float]]:
        """Waiting job id → {GPU it yielded on: seconds of cool-down left}."""
        return self.yield_watch.cooling(now, self.settings.yield_cooldown_s)

    def gpu_views(self) -> list[GpuView]:
        return self.observer.views()

    def _waiting(self) -> tuple[list[Waiting], list[Candidate]]:
        """Waiting jobs and their placement candidates, reloaded only when a job's state changed."""
        version = self.ledger.jobs_version
        if (
            self.cluster is None
            and self._waiting_cache is not None
            and self._waiting_cache[0][0] != version[0]
        ):
            # Another process (the CLI: cancel, retry, hold, release) wrote job rows and their
            # reasons ("retry requested"): the cached reasons no longer say what the rows hold.
            # On a shared ledger the other hosts change the version every tick, and rewriting
            # every waiting reason each time would be most of the database's load: there a
            # reason is written only when this host's own changes.
            self._reasons_stale = True
        if self._waiting_cache is None or self._waiting_cache[0] != version:
            rows = self.ledger.waiting()
            ids = {w.id for w in rows}
            self._no_input_here = {k: v for k, v in self._no_input_here.items() if k in ids}
            candidates = [
                Candidate(w.id, w.threshold_gib, w.priority, w.seq, w.gpus, w.submitter_uid)
                for w in rows
                if w.state != JobState.HELD and self._host_allowed(w)
            ]
            self._waiting_cache = (version, rows, candidates)
        return self._waiting_cache[1], self._waiting_cache[2]

    def waiting_jobs(self) -> list[Waiting]:
        """The waiting jobs, as placement last read them (read again only when a job's state
        changed): the metrics count them without reading a long queue at every tick."""
        return self._waiting()[0]

    def _user_states(self, now: float) -> dict[int, UserState]:
        """Each submitter's decayed usage, running jobs and GPUs in use, for placement.

        The ledger's runs are read only when a job's state changed, and then only those that
        ended since the last read (``UsageTracker``); the decay itself costs one term per
        submitter and per running job.
        """
        users: dict[int, UserState] = {}
        for job in self.all_running_jobs():
            user = users.setdefault(job.submitter_uid, UserState())
            user.running += 1
            if job.gpu_uuid is not None:
                user.gpus.add(job.gpu_uuid)
        half_life = self.settings.fair_share_half_life_s
        if half_life <= 0:
            return users
        version = self.ledger.jobs_version
        if self._usage is None or self._usage[1].half_life_s != half_life:
            self._usage = ((-1, -1), UsageTracker(half_life, now))
        if self._usage[0] != version:
            tracker = self._usage[1]
            tracker.update(self.ledger.usage_runs(tracker.since()), now)
            self._usage = (version, tracker)
        for uid, used in self._usage[1].usage(now).items():
            users.setdefault(uid, UserState()).usage = used
        return users

    def _host_allowed(self, w: Waiting) -> bool:
        """Whether the job's ``hosts`` allow-list (if any) names this host, and this host has
        not already failed to find the job's input."""
        if w.id in self._no_input_here:
            return False
        return w.hosts is None or self.cluster is None or self.cluster.host_name in w.hosts

    def _place_and_launch(self, now: float, report: TickReport) -> None:
        rows, all_candidates = self._waiting()
        reasons: dict[str, str] = {}
        for w in rows:
            if w.id in self._no_input_here:
                reasons[w.id] = self._no_input_here[w.id]
            elif not self._host_allowed(w) and w.hosts is not None:
                reasons[w.id] = f"runs only on hosts {', '.join(w.hosts)}"
        backing_off = {w.id for w in rows if w.not_before is not None and w.not_before > now}
        blocked = None
        if self.draining:
            blocked = "draining: no new jobs start (gpuspool resume)"
        elif self.observer.probe_error and not self.observer.gpus:
            blocked = f"no GPU readings: {self.observer.probe_error}"
        for w in rows:
            if w.state == JobState.HELD:
                reasons[w.id] = "held (gpuspool release to let it run)"
            elif blocked is not None and w.id not in backing_off:
                reasons[w.id] = blocked
        candidates = (
            []
            if blocked is not None
            else [c for c in all_candidates if c.job_id not in backing_off]
            if backing_off
            else all_candidates
        )
        cooling = self._cooling(now)
        if cooling and candidates:
            candidates = [
                c._replace(avoid=frozenset(cooling[c.job_id])) if c.job_id in cooling else c
                for c in candidates
            ]
        decision = place(
            candidates,
            self.gpu_views(),
            stable_polls=self.settings.stable_polls,
            users=self._user_states(now) if candidates else {},
            limits=UserLimits(self.settings.max_running_per_user, self.settings.max_gpus_per_user),
            fair=self.settings.fair_share_half_life_s > 0,
        )
        reasons.update(decision.reasons)
        for start in decision.starts:
            job = self.ledger.get(start.job_id)
            if job is None or not job.state.runnable:  # cancelled or held since the queue was read
                continue
            problem = self._launch(job, start.gpu_uuid, start.available_gib, now)
            if problem is None:
                report.started.append((job.id, start.gpu_uuid))
                reasons.pop(job.id, None)
            else:
                reasons[job.id] = problem
        self._prestart(decision, rows, now)
        if self._prestarted is not None and self._prestarted.job_id in reasons:
            reasons[self._prestarted.job_id] += PRESTARTED_NOTE
        changed = self._changed_reasons(reasons, now)
        distance = dict(decision.distance)
        distance.update({k: FIRST for k in self._no_input_here if k in reasons})
        gone = [k for k in self._reasons if k not in reasons]
        for k in gone:
            del self._reasons[k]
        stale, self._reasons_stale = self._reasons_stale, False
        if stale and reasons:
            # rewrite all; log only real changes
            self.ledger.set_reasons(reasons, now=now, distance=distance, gone=gone)
        if not changed:
            if gone and not stale:
                self.ledger.set_reasons({}, now=now, gone=gone)
            return
        self._reasons.update(changed)
        if not stale:
            self.ledger.set_reasons(changed, now=now, distance=distance, gone=gone)
        thresholds = {w.id: w.threshold_gib for w in rows}
        for n, (job_id, reason) in enumerate(changed.items()):
            if n == MAX_WAITING_EVENTS:
                # A long queue moves together; one summary keeps the journal readable.
                self.log.info("jobs_waiting", count=len(changed) - n, example_reason=reason)
                break
            self.log.info(
                "job_waiting",
                job_id=job_id,
                reason=reason,
                impossible=job_id in decision.impossible,
                threshold_gib=thresholds.get(job_id),
            )

    def _changed_reasons(self, reasons: dict[str, str], now: float) -> dict[str, str]:
        """The reasons that differ from those last written; those that differ only in their
        figures (:data:`REASON_FIGURES_EVERY_S`) only once that long has passed since the last
        time such changes were written."""
        changed = {k: v for k, v in reasons.items() if self._reasons.get(k) != v}
        if now - self._reason_figures_at >= REASON_FIGURES_EVERY_S:
            if any(_same_but_figures(self._reasons.get(k), v) for k, v in changed.items()):
                self._reason_figures_at = now
            return changed
        return {k: v for k, v in changed.items() if not _same_but_figures(self._reasons.get(k), v)}

    def worker_argv(self, job: JobRecord) -> list[str]:
        spec = job.spec
        return [
            *self.settings.worker_command,
            "--input",
            str(spec.input),
            "--output",
            str(spec.output),
            "--tokenizer",
            spec.tokenizer,
            "--device",
            self.settings.worker_device,
            "--batch-seconds",
            f"{spec.batch_seconds or self.settings.default_batch_seconds:g}",
            "--on-bad-line",
            spec.on_bad_line,
            "--dtype",
            spec.dtype,
            # restart = true: an earlier job's partial output is discarded at the first start
            # only; an interrupted or retried run of this job resumes its own.
            *(["--no-resume"] if spec.restart and job.started_at is None else []),
            *self.settings.worker_extra_args,
        ]

    def scratch_path(self, job_id: str) -> Path:
        """The job's private scratch folder (TMPDIR and caches), removed when it is final."""
        return self.settings.scratch_dir / job_id

    def _job_env(self, job_id: str, gpu_uuid: str, identity: Any) -> dict[str, str]:
        """A job's whole environment: an allow-list, never the daemon's own (which may hold
        secrets such as the webhook URL). ``job_env`` (the config) cannot override the
        variables the daemon relies on (the job id, the GPU)."""
        scratch = self.scratch_path(job_id)
        env = {
            "PATH": self.environ.get("PATH") or DEFAULT_PATH,
            "LANG": self.environ.get("LANG") or "C.UTF-8",
        }
        if identity is not None:
            from gpuspool import privileges

            env.update(privileges.identity_env(identity))
        else:
            own = ("HOME", "USER", "LOGNAME")
            env.update({k: self.environ[k] for k in own if k in self.environ})
        env.update(
            TMPDIR=str(scratch),
            XDG_CACHE_HOME=str(scratch / "cache"),
            NUMBA_CACHE_DIR=str(scratch / "numba"),
        )
        env.update(self.settings.job_env)
        env.update(
            CUDA_VISIBLE_DEVICES=gpu_uuid,
            CUDA_DEVICE_ORDER="PCI_BUS_ID",
            PYTHONUNBUFFERED="1",
        )
        env[JOB_ID_ENV] = job_id
        return env

    def _prepare_launch(self, job: JobRecord, gpu_uuid: str, log_path: Path) -> Launch:
        """Everything the runner needs to start the job; raises if the job cannot run."""
        identity = None
        popen_kwargs: dict[str, Any] = {}
        switch: list[str] = []
        if self.identity_for is not None:
            from gpuspool import privileges

            identity = self.identity_for(job.submitter_uid)
            switch, popen_kwargs = privileges.switch_after_exec(identity)
        return Launch(
            argv=self.worker_argv(job),
            env=self._job_env(job.id, gpu_uuid, identity),
            log_path=log_path,
            events_path=self.events_path(job.id),
            scratch_dir=self.scratch_path(job.id),
            owner=None if identity is None else (identity.uid, identity.gid),
            popen_kwargs=popen_kwargs,
            switch=switch,
        )

    def _log_path(self, job_id: str) -> Path:
        return self.settings.logs_dir / f"{job_id}.log"

    def _launch(self, job: JobRecord, gpu_uuid: str, available: float, now: float) -> str | None:
        """Claim the job and start its process (or let its prestarted worker go on). Any failure
        to build or start the process fails the job with the reason (never left running without
        a pid, never retried every tick)."""
        log_path = self._log_path(job.id)
        try:
            launch = self._prepare_launch(job, gpu_uuid, log_path)
        except Exception as exc:
            reason = f"cannot start the job: {_describe(exc)}"
            self._move(job, JobState.FAILED, now, reason, finished_at=now)
            self.log.warning("job_failed", job_id=job.id, reason=reason)
            return reason
        # Claim the job first, so a crash between here and the start can only requeue it.
        try:
            claimed = self._claim(job, gpu_uuid, log_path, now)
        except LedgerError as exc:
            return str(exc)
        go = {"CUDA_VISIBLE_DEVICES": gpu_uuid}
        if self.cluster is not None:  # the worker checks the fence too, before every write
            go.update({FENCE_ENV: str(claimed.fence), HOST_ENV: self.cluster.host_name})
            launch = replace(launch, env={**launch.env, **go})
        try:
            prestarted = self._go(job.id, launch, go)
            started = (
                Started(prestarted.pid, prestarted.pid_start)
                if prestarted is not None
                else self.runner.start(launch)
            )
        except Exception as exc:
            reason = f"could not start the worker: {_describe(exc)}"
            self._move(claimed, JobState.FAILED, now, reason, finished_at=now)
            self._job_event(claimed, "job_failed", reason=reason)
            self.runner.remove_scratch(self.scratch_path(job.id))
            return reason
        self._running[job.id] = _Running(
            pid=started.pid,
            pid_start=started.pid_start,
            fence=claimed.fence if self.cluster is not None else None,
        )
        self.yield_watch.started(job.id, gpu_uuid)
        try:
            self._write(claimed, now=now, pid=started.pid, pid_start=started.pid_start)
        except FencedOut:
            self._fenced_out(job.id)
            return "another host took the job as it started"
        self._job_event(
            claimed,
            "job_started",
            gpu_uuid=gpu_uuid,
            free_gib=round(available, 2),
            need_gib=job.need_gib,
            threshold_gib=job.threshold_gib,
            pid=started.pid,
            argv=launch.argv,
            # prestart: how long before the GPU came its worker had been started
            **({"prestarted_s": round(now - prestarted.at, 1)} if prestarted else {}),
            # On a shared ledger: which host, as each attempt's log lines may come from another
            **({"host": self.settings.host_name} if self.cluster is not None else {}),
        )
        return None

    # -- prestart ------------------------------------------------------------------------------

    def _prestart(self, decision: Decision, waiting: Sequence[Waiting], now: float) -> None:
        """``prestart``: keep one worker ready for the first job in line that is settling
        (``Decision.settling``: its GPU has had room for fewer than ``stable_polls`` polls). It
        imports and loads meanwhile, unseen by CUDA, and waits at its gate for its GPU
        (:meth:`_go`). It is kept while its job could still start here (a reading that dips
        for a poll or two), for :data:`PRESTART_MAX_WAIT_S` at most; a worker nobody wants any
        more is stopped before it touches the job's output."""
        current = self._prestarted
        if current is not None:
            gone = self.runner.poll(current.pid, current.pid_start)
            if gone is not None:  # it will fail the same way when it starts: let it say why then
                self._prestarted = None
                self._no_prestart.add(current.job_id)
                self.log.warning(
                    "job_prestart_exited",
                    job_id=current.job_id,
                    pid=current.pid,
                    exit_code=gone.returncode,
                    reason="its worker stopped before its GPU was free; it will start as usual",
                )
                current = None
        if self._no_prestart:  # only jobs still waiting (held ones too: a release resets nothing)
            self._no_prestart &= {w.id for w in waiting}
        if not self.settings.prestart:
            self._dismiss("prestart is off")
            return
        ready = [j for j in decision.settling if j not in self._no_prestart]
        if current is not None:
            if now - current.at >= PRESTART_MAX_WAIT_S:
                self._no_prestart.add(current.job_id)
                self._dismiss(f"waited {PRESTART_MAX_WAIT_S:g} s for its GPU")
                ready = [j for j in ready if j != current.job_id]
            elif ready and ready[0] != current.job_id:
                # Once per wait: jobs that take turns at the head of the line (their GPUs' room
                # swapped back and forth) must not have a worker started and killed every poll.
                self._no_prestart.add(current.job_id)
                self._dismiss("another job is nearer")
            elif not ready and decision.distance.get(current.job_id, FAR) == FAR:
                self._dismiss("its job cannot start here")
            else:
                return  # still first, or still within reach while no job settles
        if ready:
            self._prestart_job(ready[0], now)

    def _prestart_job(self, job_id: str, now: float) -> None:
        job = self.ledger.get(job_id)
        if job is None or not job.state.runnable:
            return
        made_scratch = not os.path.lexists(self.scratch_path(job_id))
        try:
            launch = replace(self._prepare_launch(job, "", self._log_path(job.id)), gated=True)
            started = self.runner.start(launch)
        except Exception as exc:
            self._no_prestart.add(job_id)
            self.log.warning("job_prestart_failed", job_id=job_id, reason=_describe(exc))
            return
        self._prestarted = _Prestarted(
            job_id, started.pid, started.pid_start, launch, now, made_scratch
        )
        self.log.info("job_prestarted", job_id=job_id, pid=started.pid)

    def _dismiss(self, reason: str) -> None:
        """Stop the prestarted worker, if any: it has done nothing but import."""
        current, self._prestarted = self._prestarted, None
        if current is None:
            return
        self.runner.close_gate(current.pid)
        self.runner.kill(current.pid, current.pid_start)
        self._killed.append((current.pid, current.pid_start))
        if current.made_scratch:  # an earlier attempt's stays, for the job's retry
            with contextlib.suppress(OSError):
                self.runner.remove_scratch(self.scratch_path(current.job_id))
        self.log.info("job_prestart_stopped", job_id=current.job_id, pid=current.pid, reason=reason)

    def _go(self, job_id: str, launch: Launch, go: dict[str, str]) -> _Prestarted | None:
        """Let the job's prestarted worker go on with ``go`` (its GPU, its attempt) and return
        it; None when there is none, or it was started for another launch than the job's now
        (the config was reloaded, the user's groups changed), or it is gone: then the job
        starts the usual way."""
        current = self._prestarted
        if current is None or current.job_id != job_id:
            return None
        if _as_started(current.launch) != _as_started(launch):
            self._dismiss("the job's command line, environment or user changed")
            return None
        if self.runner.poll(current.pid, current.pid_start) is not None:
            self._dismiss("its worker is gone")
            return None
        try:
            line = encode_go(go)
        except ValueError as exc:
            self._dismiss(f"no go line for it: {exc}")
            return None
        if not self.runner.open_gate(current.pid, line):
            self._dismiss("its worker did not take its GPU")
            return None
        self._prestarted = None
        return current

    def _claim(self, job: JobRecord, gpu_uuid: str, log_path: Path, now: float) -> JobRecord:
        """Mark the job running here, no pid yet. On a shared ledger one atomic statement that
        also stamps this host and the attempt's fencing token: two hosts never both win."""
        self._forget_reads()
        fields: dict[str, Any] = {
            "gpu_uuid": gpu_uuid,
            "started_at": now,
            "log_path": str(log_path),
            "reason": f"running on {gpu_uuid}",
            "not_before": None,
            "pid": None,
            "pid_start": None,
        }
        if self.cluster is not None:
            host = self.cluster.host_name
            detail = f"starting on {gpu_uuid} on {host}"
            return self.cluster.claim(job.id, now=now, detail=detail, **fields).job
        return self.ledger.transition(
            job.id,
            JobState.RUNNING,
            now=now,
            expect=sorted(RUNNABLE_STATES),
            detail=f"starting on {gpu_uuid}",
            **fields,
        )

    # -- views for the CLI and metrics ------------------------------------------------------------

    def describe_gpus(self) -> list[dict[str, Any]]:
        """Each GPU with its stability and reservations (for ``gpuspool gpus`` and metrics)."""
        return self.observer.describe()


def _as_started(launch: Launch) -> Launch:
    """``launch`` without what a prestarted worker is given only at its go line (its GPU, its
    attempt) and without its gate: equal for a prestart and the start it stands for."""
    env = {k: v for k, v in launch.env.items() if k not in GO_KEYS}
    return replace(launch, env=env, gated=False)


def _same_but_figures(before: str | None, after: str) -> bool:
    """Whether two waiting reasons differ only in the GPU they name and their GiB figures."""
    if before is None:
        return False
    return _REASON_FIGURES.sub("#", before) == _REASON_FIGURES.sub("#", after)


def _describe(exc: BaseException) -> str:
    """An exception in words, one line (a reason stored in the ledger)."""
    from gpuspool.privileges import PrivilegeError

    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, OSError | PrivilegeError) else f"{type(exc).__name__}: {text}"
