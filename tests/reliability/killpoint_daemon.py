"""Run the real daemon (``gpuspool daemon``), SIGKILLing itself at a named point of the lifecycle.

    python killpoint_daemon.py CONFIG [KILLPOINT]

``KILLPOINT`` is ``<point>`` from ``KILL_POINTS``: the daemon kills itself with SIGKILL the first
time it gets there, so a crash lands exactly between two steps that must survive it (e.g. after
the ledger took a job but before its file left ``incoming/``). Without one it runs as normal.
Nothing of the daemon is changed but a wrapper around the named method.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from typing import Any

from gpuspool import daemon, ledger, runner, spool
from gpuspool.models import JobState

#: point → (class, method, "before"/"after", predicate on the call's arguments or None)
KILL_POINTS: dict[str, tuple[Any, str, str, Any]] = {
    # intake: the ledger has the job, its file is still in incoming/
    "intake_after_ledger_add": (ledger.Ledger, "add", "after", None),
    # intake: the file is in accepted/, the "queued" reason not yet written
    "intake_after_accept": (spool.Spool, "accept", "after", None),
    # placement: the job is claimed (running, no pid), no process started
    "place_after_claim": (runner.ProcessRunner, "start", "before", None),
    # start: the process runs, its pid is not in the ledger yet
    "start_before_pid_recorded": (runner.ProcessRunner, "start", "after", None),
    # start: pid recorded, job_started not yet logged
    "start_before_started_event": (
        daemon.Daemon,
        "_job_event",
        "before",
        lambda a, k: a[2] == "job_started",
    ),
    # finish: the process is gone, its end not yet filed
    "finish_before_filing": (daemon.Daemon, "_finish", "before", None),
    # finish: the job moved to done/failed/..., the event not yet logged
    "finish_after_transition": (
        ledger.Ledger,
        "transition",
        "after",
        lambda a, k: a[2] != JobState.RUNNING,
    ),
}


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str, *, shared: bool = False) -> None:
    """Wrap the method of ``point``; ``shared``: on a PostgreSQL ledger, where the same steps
    are ``PgLedger.add`` and (for a running job's end) ``PgLedger.fenced_transition``."""
    cls, name, when, pred = KILL_POINTS[point]
    if shared and cls is ledger.Ledger:
        from gpuspool.ledger_pg import PgLedger

        cls = PgLedger
        name = "fenced_transition" if name == "transition" else name
    original = getattr(cls, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        hit = pred is None or pred(args, kwargs)
        if hit and when == "before":
            _die()
        result = original(*args, **kwargs)
        if hit:
            _die()
        return result

    setattr(cls, name, wrapper)


def main(argv: list[str]) -> int:
    if len(argv) > 1 and argv[1]:
        import tomllib

        with open(argv[0], "rb") as f:
            url = str(tomllib.load(f).get("ledger_url") or "")
        install(argv[1], shared=url.startswith("postgresql"))
    from gpuspool.cli import main as cli_main

    return cli_main(["--config", argv[0], "daemon"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
