"""``decide``: how an exit becomes done, failed, deferred, interrupted, yielded or cancelled."""

from __future__ import annotations

from typing import Any

import pytest

from gpuspool.models import JobState
from gpuspool.outcome import ExitFacts, StopReason, decide
from gpuspool.protocol import ErrorEvent, SummaryEvent

NOW = 1000.0
SUMMARY = SummaryEvent(event="summary", lines_done=4, peak_gpu_gib=1.5)


def error(code: int, reason: str = "") -> ErrorEvent:
    return ErrorEvent(event="error", exit_code=code, reason=reason)


def facts(**kw: Any) -> ExitFacts:
    base: dict[str, Any] = {"returncode": 0, "attempts": 0, "max_attempts": 3,
                            "retry_backoff_s": 10.0, "now": NOW}  # fmt: skip
    return ExitFacts(**{**base, **kw})


# (facts, state, exit class, reason (substring), attempts, not_before)
TABLE: list[tuple[str, ExitFacts, JobState, str, str, int | None, float | None]] = [
    ("exit 0 with output", facts(summary=SUMMARY), JobState.DONE, "done", "done", None, None),
    ("exit 0 without output", facts(output_exists=False), JobState.DEFERRED, "crash",
     "worker crashed; retry 2 of 3 after 10 s", 1, NOW + 10),
    ("adopted, summary", facts(returncode=None, summary=SUMMARY), JobState.DONE, "done", "done",
     None, None),
    ("adopted, error 65", facts(returncode=None, error=error(65, "line 3: bad")), JobState.FAILED,
     "data_error", "line 3: bad", None, None),
    ("adopted, nothing", facts(returncode=None), JobState.INTERRUPTED, "interrupted",
     "interrupted: process ended without finishing (killed or daemon restart); resumes", None,
     None),
    ("oom, first", facts(returncode=75, error=error(75, "CUDA out of memory: x")),
     JobState.DEFERRED, "oom", "CUDA out of memory: CUDA out of memory: x; retry 2 of 3 after 10 s",
     1, NOW + 10),
    ("oom, second: backoff doubles", facts(returncode=75, attempts=1), JobState.DEFERRED, "oom",
     "retry 3 of 3 after 20 s", 2, NOW + 20),
    ("oom, last attempt", facts(returncode=75, attempts=2), JobState.FAILED, "oom",
     "CUDA out of memory (attempt 3 of 3; giving up)", 3, None),
    ("crash", facts(returncode=1), JobState.DEFERRED, "crash", "worker crashed", 1, NOW + 10),
    ("usage", facts(returncode=64, error=error(64, "bad flags")), JobState.FAILED, "usage",
     "bad flags", None, None),
    ("config", facts(returncode=78, error=error(78, "tokenizer cannot load")), JobState.FAILED,
     "config", "tokenizer cannot load", None, None),
    ("no reason", facts(returncode=65), JobState.FAILED, "data_error",
     "worker exited with data_error (code 65)", None, None),
    ("exists, first run", facts(returncode=73), JobState.FAILED, "usage", "code 73", None, None),
    ("exists, earlier run finished it", facts(returncode=73, finished_by_earlier_run=True),
     JobState.DONE, "done", "done", None, None),
    ("SIGTERM by a daemon stop", facts(returncode=143, stop=StopReason.DAEMON_STOPPING),
     JobState.INTERRUPTED, "interrupted", "interrupted: daemon stopping; resumes", None, None),
    ("killed by a signal", facts(returncode=-9), JobState.INTERRUPTED, "interrupted",
     "killed or daemon restart", None, None),
    ("timed out", facts(returncode=143, stop=StopReason.TIMED_OUT, timeout_s=30.0),
     JobState.DEFERRED, "timeout", "timed out after 30 s; retry 2 of 3", 1, NOW + 10),
    ("timed out, one attempt", facts(returncode=-9, stop=StopReason.TIMED_OUT, timeout_s=5.0,
     max_attempts=1), JobState.FAILED, "timeout", "timed out after 5 s (attempt 1 of 1", 1, None),
    ("cancelled", facts(returncode=143, stop=StopReason.CANCELLED), JobState.CANCELLED,
     "interrupted", "cancelled by user", None, None),
    ("cancel requested, it finished anyway", facts(cancel_requested=True, summary=SUMMARY),
     JobState.CANCELLED, "done", "cancelled by user", None, None),
    # Shared ledger: the worker found a newer attempt in the output's owner file (77). The
    # ledger's fence normally refuses the filing; if it does not, the attempt counts, so a job
    # that keeps losing its own output (its owner file edited) ends.
    ("fenced out", facts(returncode=77, error=error(77, "fenced out: attempt 5 on b")),
     JobState.DEFERRED, "fenced_out",
     "output owned by another attempt: fenced out: attempt 5 on b; retry 2 of 3", 1, NOW + 10),
    ("fenced out, last attempt", facts(returncode=77, attempts=2), JobState.FAILED, "fenced_out",
     "(attempt 3 of 3; giving up)", 3, None),
    ("owner file locked", facts(returncode=74, error=error(74, "stayed locked for over 60 s")),
     JobState.DEFERRED, "output_locked", "output locked: stayed locked for over 60 s; retry 2",
     1, NOW + 10),
    # Exit 66: the input is not on this host. One host: failed. Shared ledger: left to the other
    # hosts (not an attempt), failed once no live host that may run it is left to try.
    ("no input, one host", facts(returncode=66, error=error(66, "input /d/in.jsonl not found")),
     JobState.FAILED, "no_input", "input /d/in.jsonl not found", None, None),
    ("no input, other hosts left", facts(returncode=66, error=error(66, "input x not found"),
     host="a", eligible_hosts=frozenset({"a", "b"})), JobState.DEFERRED, "no_input",
     "input not visible on host a: input x not found; waits for another host", None, NOW + 10),
    ("no input on every live host", facts(returncode=66, host="b", no_input_hosts=frozenset({"a"}),
     eligible_hosts=frozenset({"a", "b"})), JobState.FAILED, "no_input",
     "input not visible on host b: input not found; no other host that may run it is left to "
     "try (a, b did not find it)", None, None),
    ("no input, the same host again", facts(returncode=66, host="a",
     no_input_hosts=frozenset({"a"}), eligible_hosts=frozenset({"a", "b", "c"})),
     JobState.FAILED, "no_input", "left to try (a did not find it)", None, None),
    ("yielded, checkpointed", facts(returncode=143, stop=StopReason.YIELDED, attempts=2,
     yielded_to="pid 42 (user ann) on GPU 0"), JobState.QUEUED, "yielded",
     "yielded to pid 42 (user ann) on GPU 0; waits again", None, None),
    ("yielded, killed after the grace", facts(returncode=-9, stop=StopReason.YIELDED),
     JobState.QUEUED, "yielded", "yielded to another user's process", None, None),
    ("yielded, OOM before the stop landed: no attempt", facts(returncode=75,
     stop=StopReason.YIELDED, error=error(75, "CUDA out of memory")), JobState.QUEUED, "yielded",
     "yielded to", None, None),
    ("yielded, crashed meanwhile: no attempt", facts(returncode=1, stop=StopReason.YIELDED),
     JobState.QUEUED, "yielded", "yielded to", None, None),
    ("yielding, but it finished", facts(stop=StopReason.YIELDED, summary=SUMMARY),
     JobState.DONE, "done", "done", None, None),
    ("yielding, but its data is bad", facts(returncode=65, stop=StopReason.YIELDED,
     error=error(65, "line 3: bad")), JobState.FAILED, "data_error", "line 3: bad", None, None),
    ("yielding, then cancelled", facts(returncode=143, stop=StopReason.YIELDED,
     cancel_requested=True), JobState.CANCELLED, "interrupted", "cancelled by user", None, None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("facts_", "state", "exit_class", "reason", "attempts", "not_before"),
    [row[1:] for row in TABLE],
    ids=[row[0] for row in TABLE],
)
def test_decide(
    facts_: ExitFacts,
    state: JobState,
    exit_class: str,
    reason: str,
    attempts: int | None,
    not_before: float | None,
) -> None:
    out = decide(facts_)
    assert (out.state, out.exit_class) == (state, exit_class)
    assert reason in out.reason
    assert (out.attempts, out.not_before) == (attempts, not_before)
    assert out.final == state.terminal


def test_a_yield_is_marked_and_counts_no_attempt() -> None:
    out = decide(facts(returncode=143, stop=StopReason.YIELDED, attempts=1))
    assert out.yielded and out.event == "job_yielded" and out.attempts is None
    assert not decide(facts(returncode=143, stop=StopReason.DAEMON_STOPPING)).yielded


def test_peak_memory_comes_from_the_summary() -> None:
    assert decide(facts(summary=SUMMARY)).peak_gib == 1.5
    assert decide(facts()).peak_gib is None
