"""structlog configuration: JSON lines when stdout is not a terminal (journald), console on a TTY.

Standard-library loggers (APScheduler, watchdog) are routed through the same processors, so the
journal holds one format. Under systemd each line starts with its syslog priority (``<3>`` for
an error, ``<4>`` a warning, ``<6>`` info): journald strips that prefix and stores it as the
line's ``PRIORITY``, so ``journalctl -p warning`` works and ``journalctl -o cat`` still prints
bare JSON. The prefix is written only when stdout *is* the journal stream (``JOURNAL_STREAM``
names its device and inode), never into a pipe or file, which would break the JSON. This uses
the stream systemd already connected (``SyslogLevelPrefix=`` is on by default) rather than the
native journal socket: one ordered stream, no second transport that could be missing in a
sandbox, and lines never lost when journald restarts.

Every time stamp the daemon writes, in the journal and in job logs, is ISO 8601 UTC with
milliseconds (``iso_timestamp``).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Any, TextIO

import structlog

#: syslog priorities (sd-daemon(3)) of structlog's and logging's level names.
PRIORITY = {
    "critical": 2,
    "exception": 3,
    "error": 3,
    "warning": 4,
    "warn": 4,
    "notice": 5,
    "info": 6,
    "debug": 7,
}
FORMATS = ("auto", "json", "console")


def iso_timestamp(epoch: float | None = None) -> str:
    """``epoch`` (default: now) as ISO 8601 UTC, e.g. ``2026-12-01T14:38:12.316Z``.

    The one time format of the daemon's journal lines and of every event in a job's log; the
    worker uses it too, so a job log sorts and greps like the journal.
    """
    moment = datetime.fromtimestamp(time.time() if epoch is None else epoch, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_timestamp(value: Any) -> float | None:
    """Epoch seconds of an ``iso_timestamp`` string (or of a legacy epoch number), else None."""
    if isinstance(value, bool):
        return None
    try:
        if isinstance(value, (int, float)):
            return float(value)  # OverflowError for an int past the float range
        if isinstance(value, str):
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except (ValueError, OverflowError, OSError):
        pass
    return None


def journal_stream_is(stream: IO[str], environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``stream`` is the journal stream systemd connected (``JOURNAL_STREAM=dev:ino``).

    systemd.exec(5): compare the device and inode of the fd with the variable; a child whose
    stdout was redirected inherits the variable but not the stream, and gets no prefix.
    """
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not (sep and dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


def wants_color(stream: IO[str], environ: Mapping[str, str] | None = None) -> bool:
    """Colour only on a terminal, and never when ``NO_COLOR`` is set non-empty (no-color.org)."""
    env = os.environ if environ is None else environ
    return bool(not env.get("NO_COLOR") and stream.isatty())


def use_json(fmt: str, stream: IO[str]) -> bool:
    """``json``, or ``auto`` with a stream that is not a terminal (journald, a pipe, a file)."""
    return fmt == "json" or (fmt == "auto" and not stream.isatty())


class _PriorityPrefix:
    """Wraps the final renderer: each output line starts with ``<N>``, its syslog priority."""

    def __init__(self, renderer: Any) -> None:
        self._renderer = renderer

    def __call__(self, logger: Any, method_name: str, event_dict: Any) -> str:
        level = str(event_dict.get("level") or method_name).lower()
        prefix = f"<{PRIORITY.get(level, 6)}>"
        text = str(self._renderer(logger, method_name, event_dict))
        # A console-format traceback spans lines; journald reads a prefix on each one.
        return "\n".join(prefix + line for line in text.split("\n"))


def _add_timestamp(logger: Any, method_name: str, event_dict: Any) -> Any:
    event_dict["timestamp"] = iso_timestamp()
    return event_dict


def configure(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Set up structlog and the stdlib root logger. ``fmt``: auto, json or console."""
    out = sys.stdout if stream is None else stream
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _add_timestamp,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json(fmt, out)
        else structlog.dev.ConsoleRenderer(colors=wants_color(out))
    )
    if journal_stream_is(out):
        renderer = _PriorityPrefix(renderer)
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # One write per line (WriteLogger): print() writes the text and its newline apart, and a
        # stdlib log line from another thread could land between them.
        logger_factory=structlog.WriteLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.WARNING))
    # Python warnings and a crashed thread's traceback would otherwise reach stderr as bare,
    # multi-line text; as log lines they are JSON with their priority like everything else.
    logging.captureWarnings(True)
    threading.excepthook = _log_thread_exception


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    """``threading.excepthook``: an exception that ended a thread, as one error line."""
    if args.exc_type is SystemExit:
        return
    exc_info = (args.exc_type, args.exc_value, args.exc_traceback)
    thread = args.thread.name if args.thread is not None else None
    get().error("thread_failed", thread=thread, exc_info=exc_info)


def startup_format(environ: Mapping[str, str] | None = None) -> str:
    """The log format to report a start-up error in, before the config could be read:
    ``GPUSPOOL_LOG_FORMAT`` when it is valid, else ``auto`` (JSON under systemd)."""
    value = (os.environ if environ is None else environ).get("GPUSPOOL_LOG_FORMAT", "auto")
    return value if value in FORMATS else "auto"


def get(**bound: Any) -> Any:
    """A logger with ``bound`` context (``job_id``, ``gpu_uuid``, ...)."""
    return structlog.get_logger("gpuspool").bind(**bound)
