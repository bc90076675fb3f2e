"""Webhook: retries with backoff, never blocks the caller, hooked to job finish and failure."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest

from gpuspool.webhook import Webhook
from tests.conftest import Harness, gpu_entry, wait_until


class Receiver:
    """A local HTTP endpoint answering the scripted statuses in turn (then 200)."""

    def __init__(self, statuses: list[int], delay_s: float = 0.0) -> None:
        self.statuses = statuses
        self.delay_s = delay_s
        self.bodies: list[dict[str, Any]] = []
        self.attempts = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                outer.attempts += 1
                body = self.rfile.read(int(self.headers["Content-Length"]))
                time.sleep(outer.delay_s)
                code = outer.statuses.pop(0) if outer.statuses else 200
                if code == 200:
                    outer.bodies.append(json.loads(body))
                self.send_response(code)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver([503, 500])
    yield r
    r.close()


def test_retries_with_backoff_until_accepted(receiver: Receiver) -> None:
    """Two 5xx answers are retried after growing delays; the third attempt delivers the body."""
    slept: list[float] = []
    hook = Webhook(receiver.url, backoff_s=0.01, sleep=slept.append)
    assert hook.notify({"event": "job_done", "job": {"id": "j1"}})
    wait_until(lambda: receiver.bodies, timeout=10)
    hook.close()
    assert receiver.attempts == 3
    assert receiver.bodies == [{"event": "job_done", "job": {"id": "j1"}}]
    assert slept == [0.01, 0.02]


def test_client_error_is_not_retried() -> None:
    """A 400 is final: one attempt, nothing delivered."""
    r = Receiver([400])
    try:
        hook = Webhook(r.url, backoff_s=0.01)
        hook.notify({"job": {"id": "j"}})
        wait_until(lambda: r.attempts >= 1, timeout=10)
        hook.close()
        assert r.attempts == 1 and r.bodies == []
    finally:
        r.close()


def test_notify_never_blocks_and_drops_when_full() -> None:
    """With a slow endpoint, notify returns at once; past the queue bound it drops and says so."""
    r = Receiver([], delay_s=1.0)
    try:
        hook = Webhook(r.url, max_queued=2)
        t0 = time.monotonic()
        results = [hook.notify({"job": {"id": str(i)}}) for i in range(5)]
        assert time.monotonic() - t0 < 0.2
        assert results.count(False) >= 2 and hook.dropped == results.count(False)
        hook.close(timeout_s=0.1)
    finally:
        r.close()


def test_non_http_url_is_refused() -> None:
    """Only http(s) URLs are accepted."""
    with pytest.raises(ValueError, match="http"):
        Webhook("file:///etc/passwd")


def test_finish_hooks_get_the_final_record(harness: Harness) -> None:
    """A job that ends done reaches the daemon's finish hooks with its final state and summary."""
    seen: list[Any] = []
    harness.daemon.finish_hooks.append(seen.append)
    harness.daemon.finish_hooks.insert(0, lambda job: 1 / 0)  # a broken hook changes nothing
    harness.set_gpus([gpu_entry(0, 50)])
    job = harness.submit("hooked")
    for _ in range(3):
        harness.tick()
    assert harness.settle(job) == "done"
    assert [(r.id, r.state.value, r.peak_gib) for r in seen] == [(job, "done", 1.5)]


def test_finish_hooks_hear_of_a_worker_that_cannot_start(harness: Harness) -> None:
    """A job that fails for good at launch (the worker cannot be started) reaches the hooks."""
    seen: list[Any] = []
    harness.daemon.finish_hooks.append(seen.append)

    def cannot_start(launch: Any) -> Any:
        raise OSError("no such interpreter")

    harness.daemon.runner.start = cannot_start  # type: ignore[method-assign]
    harness.set_gpus([gpu_entry(0, 50)])
    job = harness.submit("unstartable")
    for _ in range(3):
        harness.tick()
    assert harness.state(job) == "failed"
    assert [(r.id, r.state.value) for r in seen] == [(job, "failed")]
    assert "could not start the worker" in seen[0].reason
