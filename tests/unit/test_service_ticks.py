"""A tick longer than the poll interval is logged (``tick_slow``), at most once a minute."""

from __future__ import annotations

from types import SimpleNamespace

from structlog.testing import capture_logs

from gpuspool.config import Settings
from gpuspool.service import Service


def test_slow_ticks_are_logged_once_a_minute_with_how_many() -> None:
    with capture_logs() as logs:
        service = Service(Settings(poll_interval_s=0.5), None)
        service.daemon = SimpleNamespace(settings=service.settings)  # type: ignore[assignment]
        service._slow_tick(0.4, now=1000.0)  # within the interval: nothing
        service._slow_tick(0.9, now=1001.0)  # the first slow one is logged
        service._slow_tick(1.5, now=1002.0)  # counted, not logged
        service._slow_tick(0.7, now=1030.0)
        service._slow_tick(2.0, now=1061.5)  # a minute on: logged with the count since
    slow = [e for e in logs if e["event"] == "tick_slow"]
    assert [(e["seconds"], e["ticks"]) for e in slow] == [(0.9, 1), (2.0, 3)]
    assert {e["log_level"] for e in slow} == {"warning"}
    assert slow[0]["poll_interval_s"] == 0.5
