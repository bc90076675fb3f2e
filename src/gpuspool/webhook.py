"""Job finish/failure notifications POSTed as JSON to ``webhook_url``.

``notify`` only puts the body on a bounded queue; one background thread sends it, retrying a
connection error, a timeout, 429 or 5xx with exponential backoff. A tick is never blocked: when
the queue is full, the notification is dropped and logged. Standard library only (urllib).
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from gpuspool import logs

_STOP = object()


class Webhook:
    """A queue and a sender thread for one URL."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 10.0,
        max_attempts: int = 6,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        max_queued: int = 1000,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"webhook_url must be an http:// or https:// URL, got {url!r}")
        self.url = url
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queued)
        self._stop = threading.Event()
        self._sleep = sleep or self._stop.wait
        self.log = logs.get()
        self.sent = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="gpuspool-webhook", daemon=True)
        self._thread.start()

    def notify(self, body: dict[str, Any]) -> bool:
        """Queue ``body`` for sending; False (and a log line) if the queue is full. Never blocks."""
        try:
            self._queue.put_nowait(body)
        except queue.Full:
            self.dropped += 1
            self.log.warning("webhook_dropped", url=self.url, job_id=body.get("job", {}).get("id"))
            return False
        return True

    def close(self, timeout_s: float = 5.0) -> None:
        """Send what is queued for up to ``timeout_s``, then stop the thread."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(_STOP)
        self._thread.join(max(0.0, deadline - time.monotonic()) + 0.1)

    def _run(self) -> None:
        while True:
            body = self._queue.get()
            if body is _STOP:
                return
            self._deliver(body)
            self._queue.task_done()

    def _deliver(self, body: dict[str, Any]) -> None:
        data = json.dumps(body, default=str).encode()
        job_id = body.get("job", {}).get("id")
        delay = self.backoff_s
        for attempt in range(1, self.max_attempts + 1):
            error = self._post(data)
            if error is None:
                self.sent += 1
                self.log.info("webhook_sent", url=self.url, job_id=job_id, attempt=attempt)
                return
            retryable, why = error
            if not retryable or attempt == self.max_attempts or self._stop.is_set():
                self.log.warning(
                    "webhook_failed", url=self.url, job_id=job_id, attempt=attempt, error=why
                )
                return
            self.log.info(
                "webhook_retry", url=self.url, job_id=job_id, attempt=attempt, error=why,
                retry_in_s=delay,
            )  # fmt: skip
            self._sleep(delay)
            delay = min(delay * 2, self.max_backoff_s)

    def _post(self, data: bytes) -> tuple[bool, str] | None:
        """None on success, else (retryable, reason)."""
        request = urllib.request.Request(
            self.url,
            data=data,
            method="POST",
            headers={"Content-Type": "application/json", "User-Agent": "gpuspool"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                response.read(65536)
        except urllib.error.HTTPError as exc:
            return (exc.code == 429 or exc.code >= 500), f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            return True, str(getattr(exc, "reason", exc))
        return None


def finish_body(job: dict[str, Any]) -> dict[str, Any]:
    """The JSON body for a job that ended: ``{"event": "job_done"|"job_failed", "job": {...}}``."""
    return {"event": f"job_{job['state']}", "job": job}
