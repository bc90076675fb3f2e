"""The worker's events: to the daemon's channel when it gives one, and on stdout (torch-free).

Events: ``start``, ``progress``, ``summary`` and ``error``; see docs/extract.md. The line format
is :mod:`gpuspool.protocol`'s. When the daemon starts the worker it announces a file descriptor
in ``GPUSPOOL_EVENTS_FD``; each event is written there in one ``write`` (the daemon reads only
that channel). Every event is also printed on stdout, one JSON object a line: by hand that is the
whole interface, under the daemon it lands in the job's human log for ``gpuspool logs``. The
stdout stream is captured when the worker starts, and Python-level prints during the run go to
stderr, so nothing else reaches it.
"""

from __future__ import annotations

import os
from typing import Any, TextIO

from gpuspool.protocol import encode_event, events_fd_from_env


class Events:
    """Writes one JSON object a line, flushed at once."""

    def __init__(self, stream: TextIO, channel_fd: int | None = None):
        self.stream = stream
        self.channel_fd = channel_fd

    @classmethod
    def from_env(cls, stream: TextIO) -> Events:
        """Events on ``stream``, and on the daemon's channel if the environment announces one."""
        return cls(stream, events_fd_from_env(os.environ))

    def emit(self, event: str, **fields: Any) -> None:
        """Write ``{"event": event, "timestamp": ..., **fields}`` (ISO 8601 UTC)."""
        line = encode_event(event, fields)
        if self.channel_fd is not None:
            try:
                os.write(self.channel_fd, line)
            except OSError:
                self.channel_fd = None  # the daemon's file is gone; stdout still has it
        self.stream.write(line.decode("utf-8"))
        self.stream.flush()
