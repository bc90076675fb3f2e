"""JSON progress events on stdout, one object a line (torch-free).

Events: ``start``, ``progress``, ``summary`` and ``error``; see docs/extract.md. The stream is
captured when the worker starts, and Python-level prints during the run go to stderr, so
nothing else reaches it.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, TextIO


def _clean(v: Any) -> Any:
    if isinstance(v, float):
        if not math.isfinite(v):
            return None
        return round(v, 4)
    return v


class Events:
    """Writes one JSON object a line, flushed at once."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def emit(self, event: str, **fields: Any) -> None:
        """Write ``{"event": event, "ts": ..., **fields}``."""
        rec: dict[str, Any] = {"event": event, "ts": round(time.time(), 3)}
        rec.update({k: _clean(v) for k, v in fields.items()})
        self.stream.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.stream.flush()
