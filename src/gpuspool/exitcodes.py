"""Exit codes shared by the extraction worker and the daemon's runner.

The worker exits with one of these; the runner classifies a finished process by them. Kept in a
module of its own so the daemon can read them without importing the worker (which imports torch).
Values follow sysexits.h where one fits.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """What a worker's exit status means to the daemon."""

    OK = 0
    #: An unexpected error (a traceback). Retried with backoff, up to max_attempts.
    CRASH = 1
    #: Wrong command-line use. Not retryable.
    USAGE = 64
    #: Bad input data (a bad line under --on-bad-line fail, unreadable input). Not retryable.
    DATA_ERROR = 65
    #: The input (or the output's folder) is not there on this host. On one host a failure like
    #: bad data; on a shared ledger most likely a host without the shared filesystem mounted.
    NO_INPUT = 66
    #: The output exists and overwriting was not asked for. Not retryable.
    OUTPUT_EXISTS = 73
    #: Shared ledger: the output's owner file stayed locked past the bounded wait (a frozen
    #: stale worker holds it). Retryable, with backoff.
    OUTPUT_LOCKED = 74
    #: Shared ledger: a newer attempt (another host) owns the output; this worker wrote nothing
    #: more. Filed as a retryable failure, so a job that keeps losing its own output ends.
    FENCED_OUT = 77
    #: The worker cannot run as configured: the tokenizer cannot load, a module is missing.
    #: Not retryable: a rerun would fail the same way (fix the job or the install, then retry).
    CONFIG = 78
    #: CUDA ran out of memory. Retryable: another tenant may have taken memory.
    OOM = 75
    #: Stopped by SIGTERM/SIGINT after a checkpoint. Resumable; not a failure.
    INTERRUPTED = 143


class ExitClass:
    """How the runner files a finished process (strings stored in the ledger)."""

    DONE = "done"
    OOM = "oom"
    DATA_ERROR = "data_error"
    INTERRUPTED = "interrupted"
    CRASH = "crash"
    USAGE = "usage"
    CONFIG = "config"
    TIMEOUT = "timeout"
    NO_INPUT = "no_input"
    OUTPUT_LOCKED = "output_locked"
    FENCED_OUT = "fenced_out"
    #: Stopped to give the GPU to another user's process (never a process's own exit code).
    YIELDED = "yielded"


def classify(returncode: int | None) -> str:
    """Map a process return code (negative: killed by that signal) to an exit class."""
    if returncode is None or returncode < 0:
        return ExitClass.INTERRUPTED
    table = {
        ExitCode.OK: ExitClass.DONE,
        ExitCode.OOM: ExitClass.OOM,
        ExitCode.DATA_ERROR: ExitClass.DATA_ERROR,
        ExitCode.NO_INPUT: ExitClass.NO_INPUT,
        ExitCode.OUTPUT_LOCKED: ExitClass.OUTPUT_LOCKED,
        ExitCode.FENCED_OUT: ExitClass.FENCED_OUT,
        ExitCode.OUTPUT_EXISTS: ExitClass.USAGE,
        ExitCode.USAGE: ExitClass.USAGE,
        ExitCode.CONFIG: ExitClass.CONFIG,
        ExitCode.INTERRUPTED: ExitClass.INTERRUPTED,
        130: ExitClass.INTERRUPTED,
        137: ExitClass.INTERRUPTED,
    }
    return table.get(returncode, ExitClass.CRASH)
