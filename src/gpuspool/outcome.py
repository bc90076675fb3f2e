"""How a job whose process is gone is filed: a pure function of what is known about the exit.

``decide(ExitFacts) -> Outcome`` holds every rule that turns an exit code, the worker's last
events, why the daemon stopped the job and its attempts so far into done, failed, deferred (with
backoff), interrupted, yielded (queued again, no attempt counted) or cancelled. No I/O and no
clock, so the rules are tested as a table (tests/unit/test_outcome.py); the daemon gathers the
facts and applies the outcome.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from gpuspool.exitcodes import ExitClass, ExitCode, classify
from gpuspool.models import JobState
from gpuspool.protocol import ErrorEvent, SummaryEvent

#: How the reason of an attempt that did not find the job's input on its host begins (then the
#: host's name): the daemons recognise such attempts in the audit trail by it.
NO_INPUT_PREFIX = "input not visible on host "


class StopReason(StrEnum):
    """Why the daemon stopped a job's process (None when the process ended by itself)."""

    CANCELLED = "cancelled by user"
    TIMED_OUT = "timed out"
    DAEMON_STOPPING = "daemon stopping"
    #: Another user's process came to the job's GPU (``yield_on_foreign_process``,
    #: ``yield_when_free_below_gib``): the job steps aside and waits again.
    YIELDED = "yielding the GPU to a process gpuspool did not start"


@dataclass(frozen=True, slots=True)
class ExitFacts:
    """What the daemon knows when it finds a job's process gone."""

    #: The exit status; None when the process was not the daemon's child (adopted after a restart).
    returncode: int | None
    attempts: int
    max_attempts: int
    retry_backoff_s: float
    now: float
    error: ErrorEvent | None = None
    summary: SummaryEvent | None = None
    stop: StopReason | None = None
    #: The timeout that stopped it (for the reason's words), when ``stop`` is TIMED_OUT.
    timeout_s: float | None = None
    cancel_requested: bool = False
    output_exists: bool = True
    #: Whom the job yielded to, in words ("pid 4242 (user ann) on GPU 0"), when ``stop`` is
    #: YIELDED.
    yielded_to: str | None = None
    #: A complete output with no partial left, after an earlier run of this job: see
    #: ``Daemon._finished_by_earlier_run``. Only consulted for "output exists" (73).
    finished_by_earlier_run: bool = False
    #: Shared ledger: this host's name (None on one host).
    host: str | None = None
    #: Shared ledger, exit 66: the hosts whose earlier attempts did not find the job's input.
    no_input_hosts: frozenset[str] = frozenset()
    #: Shared ledger, exit 66: the live hosts the job may run on (this one too).
    eligible_hosts: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Outcome:
    """Where the job goes, and what to record and announce."""

    state: JobState
    reason: str
    exit_class: str
    #: The job event to log ("job_finished", "job_failed", "job_retry_scheduled", ...).
    event: str
    #: The job's attempts after this exit, when it changed (retryable failures count).
    attempts: int | None = None
    not_before: float | None = None
    retry_in_s: float | None = None
    peak_gib: float | None = None
    #: The job stepped aside for another user's process: one more yield, no attempt counted.
    yielded: bool = False

    @property
    def final(self) -> bool:
        return self.state in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


def exit_code(facts: ExitFacts) -> int | None:
    """The exit status, or for an adopted process the one its last events imply."""
    if facts.returncode is not None:
        return facts.returncode
    if facts.error is not None:
        return facts.error.exit_code
    if facts.summary is not None:
        return 0
    return None


def exit_class(facts: ExitFacts) -> str:
    """The exit class: the code's, corrected by what is on disk."""
    code = exit_code(facts)
    cls = classify(code)
    if cls == ExitClass.DONE and not facts.output_exists:
        return ExitClass.CRASH  # said "done" but left no output
    if code == ExitCode.OUTPUT_EXISTS and facts.finished_by_earlier_run:
        return ExitClass.DONE
    return cls


def decide(facts: ExitFacts) -> Outcome:
    """File a job whose process is gone (see the module docstring)."""
    cls = exit_class(facts)
    peak = facts.summary.peak_gpu_gib if facts.summary is not None else None
    error = facts.error.reason if facts.error is not None and facts.error.reason else None
    if facts.stop == StopReason.CANCELLED or facts.cancel_requested:
        return Outcome(JobState.CANCELLED, "cancelled by user", cls, "job_cancelled", peak_gib=peak)
    if cls == ExitClass.DONE:
        return Outcome(JobState.DONE, "done", cls, "job_finished", peak_gib=peak)
    if facts.stop == StopReason.YIELDED and cls in _YIELD_CLASSES:
        who = facts.yielded_to or "another user's process"
        return Outcome(
            JobState.QUEUED, f"yielded to {who}; waits again", ExitClass.YIELDED, "job_yielded",
            peak_gib=peak, yielded=True,
        )  # fmt: skip
    if facts.stop == StopReason.TIMED_OUT:
        limit = f" after {facts.timeout_s:.0f} s" if facts.timeout_s is not None else ""
        return _retry_or_fail(facts, f"timed out{limit}", ExitClass.TIMEOUT, peak)
    if cls == ExitClass.INTERRUPTED:
        why = facts.stop.value if facts.stop is not None else None
        why = why or "process ended without finishing (killed or daemon restart)"
        return Outcome(
            JobState.INTERRUPTED, f"interrupted: {why}; resumes", cls, "job_interrupted",
            peak_gib=peak,
        )  # fmt: skip
    if cls == ExitClass.NO_INPUT:
        return _no_input(facts, error or "input not found", peak)
    if cls == ExitClass.FENCED_OUT:
        # Normally never filed: the ledger's fence refuses the stale host's write. Filed only if
        # the ledger still names this attempt (the owner file was edited): counted, so it ends.
        detail = error or "a newer attempt owns the output"
        return _retry_or_fail(facts, f"output owned by another attempt: {detail}", cls, peak)
    if cls == ExitClass.OUTPUT_LOCKED:
        return _retry_or_fail(facts, f"output locked: {error}" if error else "output locked",
                              cls, peak)  # fmt: skip
    if cls in (ExitClass.OOM, ExitClass.CRASH):
        label = "CUDA out of memory" if cls == ExitClass.OOM else "worker crashed"
        return _retry_or_fail(facts, f"{label}: {error}" if error else label, cls, peak)
    detail = error or f"worker exited with {cls} (code {exit_code(facts)})"
    return Outcome(JobState.FAILED, detail, cls, "job_failed", peak_gib=peak)


def _no_input(facts: ExitFacts, detail: str, peak: float | None) -> Outcome:
    """The worker did not find the job's input (or its output folder) on this host (exit 66).

    On one host the input is gone: the job fails. On a shared ledger the host that took the job
    in saw it, so this host most likely lacks the shared filesystem: the job goes back to the
    queue for the other hosts (not counted as an attempt; this host does not take it again),
    and fails once every live host that may run it has not found it, or this host meets it a
    second time (after a restart). So it never bounces for ever, nor eats the queue of a
    misconfigured host."""
    cls = ExitClass.NO_INPUT
    if facts.host is None:
        return Outcome(JobState.FAILED, detail, cls, "job_failed", peak_gib=peak)
    tried = facts.no_input_hosts | {facts.host}
    head = f"{NO_INPUT_PREFIX}{facts.host}: {detail}"
    if facts.host in facts.no_input_hosts or facts.eligible_hosts <= tried:
        seen = ", ".join(sorted(tried))
        reason = f"{head}; no other host that may run it is left to try ({seen} did not find it)"
        return Outcome(JobState.FAILED, reason, cls, "job_failed", peak_gib=peak)
    delay = facts.retry_backoff_s
    return Outcome(
        JobState.DEFERRED,
        f"{head}; waits for another host",
        cls,
        "job_retry_scheduled",
        not_before=facts.now + delay,
        retry_in_s=delay,
        peak_gib=peak,
    )


#: The exits a yield may end in: the checkpointed stop, the SIGKILL after the grace, and the
#: out-of-memory or crash the newcomer's allocations can cause before the stop lands. A data or
#: configuration error is the job's own and is filed as such.
_YIELD_CLASSES = frozenset({ExitClass.INTERRUPTED, ExitClass.OOM, ExitClass.CRASH})


def _retry_or_fail(facts: ExitFacts, detail: str, cls: str, peak: float | None) -> Outcome:
    """A retryable failure: deferred with exponential backoff, or failed at the last attempt."""
    attempts = facts.attempts + 1
    limit = facts.max_attempts
    if attempts >= limit:
        reason = f"{detail} (attempt {attempts} of {limit}; giving up)"
        return Outcome(JobState.FAILED, reason, cls, "job_failed", attempts=attempts, peak_gib=peak)
    delay = facts.retry_backoff_s * (2 ** (attempts - 1))
    return Outcome(
        JobState.DEFERRED,
        f"{detail}; retry {attempts + 1} of {limit} after {delay:.0f} s",
        cls,
        "job_retry_scheduled",
        attempts=attempts,
        not_before=facts.now + delay,
        retry_in_s=delay,
        peak_gib=peak,
    )
