"""APScheduler wiring only: one interval job that runs the tick, serialised and coalescing."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

TICK_JOB_ID = "tick"


class TickScheduler:
    """Runs ``tick`` every ``interval_s`` on one thread; ``wake()`` runs it now."""

    def __init__(self, tick: Callable[[], None], interval_s: float) -> None:
        self._scheduler: Any = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=1)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 3600},
            timezone=UTC,
        )
        self._tick = tick
        self._interval_s = interval_s

    def start(self) -> None:
        self._scheduler.add_job(
            self._tick,
            "interval",
            seconds=self._interval_s,
            id=TICK_JOB_ID,
            next_run_time=datetime.now(UTC),
        )
        self._scheduler.start()

    def wake(self) -> None:
        """Run the tick as soon as the executor is free (e.g. a job file arrived)."""
        job = self._scheduler.get_job(TICK_JOB_ID)
        if job is not None:
            job.modify(next_run_time=datetime.now(UTC))

    def reschedule(self, interval_s: float) -> None:
        if interval_s != self._interval_s:
            self._interval_s = interval_s
            self._scheduler.reschedule_job(TICK_JOB_ID, trigger="interval", seconds=interval_s)

    def shutdown(self) -> None:
        """Stop; waits for a tick in progress to finish."""
        self._scheduler.shutdown(wait=True)
