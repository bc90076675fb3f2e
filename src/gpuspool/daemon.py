"""The daemon's logic: ``tick(now)`` = intake → reap → probe → place → launch.

No real clock and no ``os.environ`` here: ``now`` comes from the caller (the scheduler, or a test
with fake time) and the process environment is handed in. The service loop around it (signals,
scheduler, systemd) lives in ``service.py``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpuspool import logs
from gpuspool.config import Settings
from gpuspool.estimate import job_need_gib, job_threshold_gib
from gpuspool.exitcodes import ExitClass, ExitCode, classify
from gpuspool.fairshare import UsageTracker, UserLimits, UserState
from gpuspool.gpus import GpuProbe, ProbeResult
from gpuspool.ledger import JobRecord, LedgerError, Waiting
from gpuspool.ledger_api import LedgerBackend
from gpuspool.models import RUNNABLE_STATES, JobSpec, JobState
from gpuspool.observe import GpuObserver
from gpuspool.placement import Candidate, GpuView, place
from gpuspool.privileges import job_priority
from gpuspool.runner import (
    JOB_ID_ENV,
    Exit,
    Launch,
    Runner,
    find_job_processes,
    is_alive,
    kill_leftovers,
)
from gpuspool.spool import RawJob, Refusal, Spool, display_name, validate_spec
from gpuspool.systemd import scrub_env

#: Longest stretch of a job's log read in one tick; a flooding worker is skipped ahead.
MAX_LOG_READ = 1 << 20
#: Per tick, waiting-reason changes logged one by one; the rest are summed up in one event.
MAX_WAITING_EVENTS = 50


@dataclass
class _Running:
    """What the daemon tracks in memory about a running job."""

    log_offset: int = 0
    last_progress_log: float = float("-inf")
    stop_deadline: float | None = None
    stop_reason: str | None = None
    last_events: dict[str, dict[str, Any]] = field(default_factory=dict)


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
        #: What the GPUs showed at the last polls, and the running jobs' reservations.
        self.observer = GpuObserver(settings.stable_polls)
        self._reasons: dict[str, str] = {}
        self._running: dict[str, _Running] = {}
        self._now = 0.0  # the time of the tick in progress, for events written to job logs
        self._waiting_cache: tuple[tuple[int, int], list[Waiting], list[Candidate]] | None = None
        self._usage: tuple[tuple[int, int], UsageTracker] | None = None
        self._reasons_stale = False
        self.stopping = False
        self.last_tick_done: float | None = None
        self.last_report = TickReport()
        #: Called with a job's final record when it ends done or failed (e.g. the webhook).
        self.finish_hooks: list[Callable[[JobRecord], None]] = []

    # -- lifecycle ---------------------------------------------------------------------------------

    def startup(self, now: float) -> None:
        """Recover after a restart: adopt live jobs, requeue those whose process is gone."""
        self._now = now
        self.spool.ensure_dirs()
        self.settings.logs_dir.mkdir(parents=True, exist_ok=True)
        orphans = find_job_processes() if self.ledger.jobs([JobState.RUNNING]) else {}
        for job in self.ledger.jobs([JobState.RUNNING]):
            if job.pid is None and job.id in orphans:
                # Started just before a crash, before its pid was recorded: adopt, never rerun.
                pid, created = orphans[job.id]
                job = self.ledger.transition(
                    job.id, JobState.RUNNING, now=now, pid=pid, pid_start=created
                )
            if is_alive(job.pid, job.pid_start):
                self._running[job.id] = _Running()
                self.log.info("job_adopted", job_id=job.id, pid=job.pid, gpu_uuid=job.gpu_uuid)
                continue
            self._running[job.id] = _Running()
            self._read_log(job, now)
            self._finish(job, Exit(None), now)

    @property
    def draining(self) -> bool:
        return self.ledger.draining()

    def tick(self, now: float) -> TickReport:
        """Everything the daemon does at one poll. Never raises for a job's or a file's fault."""
        self._now = now
        report = TickReport()
        self.intake(now, report)
        self.reap(now, report)
        result = self.probe.poll()
        self._observe(result, now, report)
        if not self.stopping:
            self._place_and_launch(now, report)
        self.ledger.set_meta("gpus", json.dumps({"at": now, "gpus": self.describe_gpus()}))
        self.last_tick_done = now
        self.last_report = report
        return report

    def stop_all(self, now: float, *, hard: bool = False) -> None:
        """Stop every running job (SIGTERM, or SIGKILL when ``hard``); they resume later."""
        self.stopping = True
        for job in self.ledger.jobs([JobState.RUNNING]):
            if job.pid is None:
                continue
            state = self._running.setdefault(job.id, _Running())
            state.stop_reason = state.stop_reason or "daemon stopping"
            if hard:
                self.runner.kill(job.pid, job.pid_start)
            else:
                self.runner.terminate(job.pid, job.pid_start)
                state.stop_deadline = now + self.settings.stop_grace_s

    def running_count(self) -> int:
        return self.ledger.counts().get(JobState.RUNNING.value, 0)

    # -- intake ------------------------------------------------------------------------------------

    def intake(self, now: float, report: TickReport) -> None:
        for name in self.spool.pending():
            try:
                self._intake_one(name, now, report)
            except Exception as exc:  # a bad file must never stop the daemon
                self._reject(name, f"internal error while reading: {exc!r}", now, report)

    def _intake_one(self, name: bytes, now: float, report: TickReport) -> None:
        raw = self.spool.read(name)
        if isinstance(raw, Refusal):
            self._reject(name, raw.reason, now, report)
            return
        if self.ledger.get(raw.job_id) is not None:
            # Taken into the ledger just before a crash: finish moving its file, check nothing
            # again (its output is now "claimed" by itself).
            self.spool.accept(raw)
            return
        try:
            spec = validate_spec(raw.data)
            reason = self._check_job(spec, raw)
        except ValueError as exc:
            self._reject(name, str(exc), now, report)
            return
        if reason is not None:
            self._reject(name, reason, now, report)
            return
        need = self._need_gib(spec)
        threshold = self._threshold_gib(spec, need)
        spec, priority_note = job_priority(spec, raw.submitter_uid, self.settings)
        added = self.ledger.add(
            job_id=raw.job_id,
            spec=spec,
            submitter_uid=raw.submitter_uid,
            need_gib=need,
            threshold_gib=threshold,
            spool_file=None,
            now=now,
            note=priority_note,
        )
        dest = self.spool.accept(raw)
        if added:
            self.ledger.update(raw.job_id, now=now, reason="queued")
            report.accepted.append(raw.job_id)
            self.log.info(
                "job_accepted",
                job_id=raw.job_id,
                name=spec.name,
                file=display_name(raw.name),
                submitter_uid=raw.submitter_uid,
                need_gib=need,
                threshold_gib=threshold,
                accepted_as=str(dest),
            )

    def _reject(self, name: bytes, reason: str, now: float, report: TickReport) -> None:
        try:
            where = self.spool.reject(name, reason, now=now)
        except OSError as exc:
            where = None
            reason = f"{reason} (and could not be moved: {exc})"
        report.rejected.append(display_name(name))
        self.log.warning(
            "job_rejected", file=display_name(name), reason=reason, reason_file=str(where)
        )

    def _check_job(self, spec: JobSpec, raw: RawJob) -> str | None:
        """Checks beyond the schema: paths as the submitter sees them; None if all is well."""
        if self.identity_for is not None:
            from gpuspool import privileges

            try:
                runs_as = self.identity_for(raw.submitter_uid)
                submitter = privileges.identity_for_uid(raw.submitter_uid)
            except Exception as exc:
                return str(exc)
            problem = privileges.check_job_paths(submitter, runs_as, spec.input, spec.output)
            if problem is not None:
                return problem
        else:
            if not spec.input.is_file():
                return f"input: {spec.input} does not exist or is not a file"
            if spec.output.exists():
                return f"output: {spec.output} already exists"
            if not spec.output.parent.is_dir():
                return f"output: folder {spec.output.parent} does not exist"
        if spec.tokenizer.startswith("/") and not Path(spec.tokenizer).exists():
            return f"tokenizer: {spec.tokenizer} does not exist"
        other = self.ledger.output_claimed(str(spec.output))
        if other is not None:
            return f"output: {spec.output} is already the output of job {other}"
        return None

    def _need_gib(self, spec: JobSpec) -> float:
        need = job_need_gib(spec, self.settings.default_batch_seconds)
        if need.partial is not None:
            self.log.warning("need_estimate_partial", input=str(spec.input), error=need.partial)
        return need.gib

    def _threshold_gib(self, spec: JobSpec, need: float) -> float:
        return job_threshold_gib(spec, self.settings.min_free_gib, need)

    # -- running jobs ------------------------------------------------------------------------------

    def reap(self, now: float, report: TickReport) -> None:
        self._now = now
        for job in self.ledger.jobs([JobState.RUNNING]):
            state = self._running.setdefault(job.id, _Running())
            self._read_log(job, now)
            if job.pid is None:
                self._finish(job, Exit(None), now, report)
                continue
            gone = self.runner.poll(job.pid, job.pid_start)
            if gone is not None:
                self._finish(job, gone, now, report)
                continue
            if job.cancel_requested and state.stop_reason is None:
                state.stop_reason = "cancelled by user"
                state.stop_deadline = now + self.settings.stop_grace_s
                self.runner.terminate(job.pid, job.pid_start)
                self._job_event(job, "job_stopping", reason=state.stop_reason)
            timeout = job.spec.timeout_s or self.settings.job_timeout_s
            if (
                timeout is not None
                and state.stop_reason is None
                and job.started_at is not None
                and now - job.started_at > timeout
            ):
                state.stop_reason = f"timed out after {timeout:.0f} s"
                state.stop_deadline = now + self.settings.stop_grace_s
                self.runner.terminate(job.pid, job.pid_start)
                self._job_event(job, "job_stopping", reason=state.stop_reason)
            if state.stop_deadline is not None and now >= state.stop_deadline:
                self.runner.kill(job.pid, job.pid_start)
                state.stop_deadline = None

    def _read_log(self, job: JobRecord, now: float) -> None:
        """Take the worker's new JSON events from its log; relay progress."""
        if not job.log_path:
            return
        state = self._running.setdefault(job.id, _Running())
        try:
            with open(job.log_path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size - state.log_offset > MAX_LOG_READ:
                    state.log_offset = size - 65536  # skip a flood, keep the latest events
                f.seek(state.log_offset)
                chunk = f.read(MAX_LOG_READ)
        except OSError:
            return
        end = chunk.rfind(b"\n")
        if end < 0:
            return
        state.log_offset += end + 1
        for line in chunk[: end + 1].splitlines():
            if not line.startswith(b"{"):
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if not isinstance(event, dict) or event.get("source") == "daemon":
                continue
            kind = event.get("event")
            if kind in ("start", "progress", "summary", "error"):
                state.last_events[str(kind)] = event
        progress = state.last_events.get("progress") or state.last_events.get("start")
        if progress is None:
            return
        fields = {k: v for k, v in progress.items() if k not in ("event", "source")}
        if fields != job.progress:
            self.ledger.update(job.id, now=now, progress=fields)
            if now - state.last_progress_log >= self.settings.progress_log_interval_s:
                state.last_progress_log = now
                self.log.info("job_progress", job_id=job.id, gpu_uuid=job.gpu_uuid, **fields)

    def _finish(
        self, job: JobRecord, gone: Exit, now: float, report: TickReport | None = None
    ) -> None:
        """File a job whose process is gone, by its exit code (or, if adopted, its last event)."""
        state = self._running.pop(job.id, _Running())
        strays = kill_leftovers(job.id)
        if strays:
            self.log.warning("job_strays_killed", job_id=job.id, pids=strays)
        events = state.last_events
        code = gone.returncode
        if code is None and "error" in events:
            code = int(events["error"].get("exit_code", 1))
        elif code is None and "summary" in events:
            code = 0
        exit_class = classify(code)
        if exit_class == ExitClass.DONE and not Path(job.output).exists():
            exit_class = ExitClass.CRASH
        if code == ExitCode.OUTPUT_EXISTS and self._finished_by_earlier_run(job):
            exit_class = ExitClass.DONE
        summary = events.get("summary", {})
        error_reason = events.get("error", {}).get("reason")
        peak = summary.get("peak_gpu_gib")
        base: dict[str, Any] = {"pid": None, "pid_start": None, "exit_class": exit_class}
        if isinstance(peak, (int, float)):
            base["peak_gib"] = float(peak)
        if state.stop_reason == "cancelled by user" or job.cancel_requested:
            self._move(job, JobState.CANCELLED, now, "cancelled by user", finished_at=now, **base)
            self._job_event(job, "job_cancelled")
        elif exit_class == ExitClass.DONE:
            if summary:
                final = {**job.progress, **{k: v for k, v in summary.items() if k != "event"}}
                final["lines_total"] = final.get("lines_total") or summary.get("lines_done")
                self.ledger.update(job.id, now=now, progress=final)
            self._move(job, JobState.DONE, now, "done", finished_at=now, **base)
            self._job_event(job, "job_finished", summary=summary, peak_gib=base.get("peak_gib"))
        elif state.stop_reason and state.stop_reason.startswith("timed out"):
            self._retry_or_fail(
                job, now, state.stop_reason, {**base, "exit_class": ExitClass.TIMEOUT}
            )
        elif exit_class == ExitClass.INTERRUPTED:
            why = state.stop_reason or "process ended without finishing (killed or daemon restart)"
            self._move(job, JobState.INTERRUPTED, now, f"interrupted: {why}; resumes", **base)
            self._job_event(job, "job_interrupted", reason=why)
        elif exit_class in (ExitClass.OOM, ExitClass.CRASH):
            label = "CUDA out of memory" if exit_class == ExitClass.OOM else "worker crashed"
            detail = f"{label}: {error_reason}" if error_reason else label
            self._retry_or_fail(job, now, detail, base)
        else:
            detail = error_reason or f"worker exited with {exit_class} (code {code})"
            self._move(job, JobState.FAILED, now, detail, finished_at=now, **base)
            self._job_event(job, "job_failed", reason=detail, exit_class=exit_class)
        if report is not None:
            report.finished.append((job.id, exit_class))

    def _finished_by_earlier_run(self, job: JobRecord) -> bool:
        """An earlier run of this job renamed its complete output into place, then was killed
        before it said so; the rerun then finds the output. Intake made sure the output did not
        exist and no other job claims it, so a complete output with no partial left is ours."""
        from gpuspool.extract.writer import partial_path  # torch-free

        output = Path(job.output)
        if not output.is_file() or partial_path(output).exists():
            return False
        runs = [t for t in self.ledger.transitions(job.id) if t["to_state"] == "running"]
        return len(runs) >= 2

    def _retry_or_fail(self, job: JobRecord, now: float, detail: str, base: dict[str, Any]) -> None:
        attempts = job.attempts + 1
        limit = job.spec.max_attempts or self.settings.max_attempts
        if attempts >= limit:
            reason = f"{detail} (attempt {attempts} of {limit}; giving up)"
            self._move(
                job, JobState.FAILED, now, reason, finished_at=now, attempts=attempts, **base
            )
            self._job_event(job, "job_failed", reason=reason, exit_class=base["exit_class"])
            return
        delay = self.settings.retry_backoff_s * (2 ** (attempts - 1))
        reason = f"{detail}; retry {attempts + 1} of {limit} after {delay:.0f} s"
        self._move(
            job, JobState.DEFERRED, now, reason, attempts=attempts, not_before=now + delay, **base
        )
        self._job_event(job, "job_retry_scheduled", reason=reason, retry_in_s=delay)

    def _move(
        self, job: JobRecord, to: JobState, now: float, reason: str, **fields: Any
    ) -> JobRecord | None:
        """Move a job on from the state it was read in; a job that ends done or failed is handed
        to each ``finish_hooks`` entry (webhooks). None if the job had moved on meanwhile."""
        try:
            moved = self.ledger.transition(
                job.id, to, now=now, expect=[job.state], detail=reason, reason=reason, **fields
            )
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
        self.observer.observe(result, self.ledger.jobs([JobState.RUNNING]))
        report.probe_error = result.error
        rows = self.observer.history_rows(now)
        if rows is not None:
            older = self.observer.prune_before(now)
            if older is not None:
                self.ledger.prune_gpu_history(older)
            self.ledger.record_gpu_history(now, rows)

    def gpu_views(self) -> list[GpuView]:
        return self.observer.views()

    def _waiting(self) -> tuple[list[Waiting], list[Candidate]]:
        """Waiting jobs and their placement candidates, reloaded only when a job's state changed."""
        version = self.ledger.jobs_version
        if self._waiting_cache is not None and self._waiting_cache[0][0] != version[0]:
            # Another process (the CLI: cancel, retry, hold, release) wrote job rows and their
            # reasons ("retry requested"): the cached reasons no longer say what the rows hold.
            self._reasons_stale = True
        if self._waiting_cache is None or self._waiting_cache[0] != version:
            rows = self.ledger.waiting()
            candidates = [
                Candidate(w.id, w.threshold_gib, w.priority, w.seq, w.gpus, w.submitter_uid)
                for w in rows
                if w.state != JobState.HELD
            ]
            self._waiting_cache = (version, rows, candidates)
        return self._waiting_cache[1], self._waiting_cache[2]

    def _user_states(self, now: float) -> dict[int, UserState]:
        """Each submitter's decayed usage, running jobs and GPUs in use, for placement.

        The ledger's runs are read only when a job's state changed, and then only those that
        ended since the last read (``UsageTracker``); the decay itself costs one term per
        submitter and per running job.
        """
        users: dict[int, UserState] = {}
        for job in self.ledger.jobs([JobState.RUNNING]):
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

    def _place_and_launch(self, now: float, report: TickReport) -> None:
        rows, all_candidates = self._waiting()
        reasons: dict[str, str] = {}
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
        changed = {k: v for k, v in reasons.items() if self._reasons.get(k) != v}
        stale, self._reasons_stale = self._reasons_stale, False
        if stale and reasons:
            self.ledger.set_reasons(reasons, now=now)  # rewrite all; log only real changes
        if not changed:
            return
        self._reasons.update(changed)
        if not stale:
            self.ledger.set_reasons(changed, now=now)
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
            *self.settings.worker_extra_args,
        ]

    def _job_env(self, job_id: str, gpu_uuid: str, identity: Any) -> dict[str, str]:
        env = scrub_env(self.environ)
        env.update(
            CUDA_VISIBLE_DEVICES=gpu_uuid,
            CUDA_DEVICE_ORDER="PCI_BUS_ID",
            PYTHONUNBUFFERED="1",
        )
        env[JOB_ID_ENV] = job_id
        if identity is not None:
            from gpuspool import privileges

            env.update(privileges.identity_env(identity))
        return env

    def _launch(self, job: JobRecord, gpu_uuid: str, available: float, now: float) -> str | None:
        identity = None
        popen_kwargs: dict[str, Any] = {}
        if self.identity_for is not None:
            try:
                identity = self.identity_for(job.submitter_uid)
            except Exception as exc:
                self._move(job, JobState.FAILED, now, str(exc), finished_at=now)
                return str(exc)
            from gpuspool import privileges

            popen_kwargs = privileges.popen_kwargs(identity)
        log_path = self.settings.logs_dir / f"{job.id}.log"
        launch = Launch(
            argv=self.worker_argv(job),
            env=self._job_env(job.id, gpu_uuid, identity),
            log_path=log_path,
            cwd=job.spec.output.parent,
            popen_kwargs=popen_kwargs,
        )
        # Claim the job first, so a crash between here and the start can only requeue it.
        try:
            claimed = self.ledger.transition(
                job.id,
                JobState.RUNNING,
                now=now,
                expect=sorted(RUNNABLE_STATES),
                detail=f"starting on {gpu_uuid}",
                gpu_uuid=gpu_uuid,
                started_at=now,
                log_path=str(log_path),
                reason=f"running on {gpu_uuid}",
                not_before=None,
                pid=None,
                pid_start=None,
            )
        except LedgerError as exc:
            return str(exc)
        try:
            started = self.runner.start(launch)
        except OSError as exc:
            reason = f"could not start the worker: {exc}"
            self._move(claimed, JobState.FAILED, now, reason, finished_at=now)
            self._job_event(claimed, "job_failed", reason=reason)
            return reason
        self.ledger.transition(
            job.id, JobState.RUNNING, now=now, pid=started.pid, pid_start=started.pid_start
        )
        self._running[job.id] = _Running()
        self._reasons.pop(job.id, None)
        self._job_event(
            claimed,
            "job_started",
            gpu_uuid=gpu_uuid,
            free_gib=round(available, 2),
            need_gib=job.need_gib,
            threshold_gib=job.threshold_gib,
            pid=started.pid,
            argv=launch.argv,
        )
        return None

    # -- views for the CLI and metrics ------------------------------------------------------------

    def describe_gpus(self) -> list[dict[str, Any]]:
        """Each GPU with its stability and reservations (for ``gpuspool gpus`` and metrics)."""
        return self.observer.describe()
