"""The daemon under a real AF_UNIX notify socket: READY, STATUS, WATCHDOG, reload and stop."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import gpu_entry, wait_until
from tests.integration.conftest import LiveDaemon, wait_state


class NotifySocket:
    """What systemd's end of NOTIFY_SOCKET sees."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []

    def drain(self, seconds: float) -> list[tuple[float, str]]:
        end = time.monotonic() + seconds
        got = []
        while time.monotonic() < end:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            for line in data.decode().splitlines():
                got.append((time.monotonic(), line))
        self.messages.extend(got)
        return got


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    s = NotifySocket(tmp_path / "notify.sock")
    yield s
    s.sock.close()


def start(live: LiveDaemon, notify: NotifySocket, watchdog_usec: int, wait: bool = True) -> None:
    """Start the daemon as systemd would, with a notify socket and a watchdog interval."""
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(watchdog_usec)}
    live.start(env, wait=wait)


def test_ready_status_and_watchdog_then_pings_stop_when_tick_hangs(
    live: LiveDaemon, notify: NotifySocket
) -> None:
    """READY=1 after start, STATUS= with a summary, WATCHDOG=1 at half the interval; when a tick
    hangs (the GPU source blocks) the pings stop, so systemd would restart the daemon."""
    live.set_gpus(gpu_entry(0, 50), gpu_entry(1, 5))
    start(live, notify, watchdog_usec=1_000_000, wait=False)
    got = [m for _, m in notify.drain(4.0)]
    assert "READY=1" in got
    statuses = [m for m in got if m.startswith("STATUS=")]
    assert statuses and "waiting" in statuses[-1] and "GPUs: 2 seen" in statuses[-1]
    pings = [t for t, m in notify.messages if m == "WATCHDOG=1"]
    assert len(pings) >= 4
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) < 1.0  # systemd's deadline is 1 s
    # Replace the GPU file with a FIFO: the next poll blocks opening it, as a hung NVML would.
    fifo = live.tmp / "gpus.fifo"
    os.mkfifo(fifo)
    os.replace(fifo, live.gpu_file)
    notify.drain(3.0)  # ticks stop completing; pings continue only until they look stale
    later = notify.drain(3.0)
    assert [m for _, m in later if m == "WATCHDOG=1"] == []
    assert live.proc is not None and live.proc.poll() is None  # hung, not dead
    live.proc.kill()
    live.proc.wait()


def test_sighup_reloads_config_and_keeps_running_job(
    live: LiveDaemon, notify: NotifySocket, tokenizer_dir: Path, audio_input: Path,
    reference_output: bytes,
) -> None:  # fmt: skip
    """SIGHUP re-reads the config (RELOADING=1 then READY=1) and leaves the running job alone."""
    live.set_gpus(gpu_entry(0, 50))
    start(live, notify, watchdog_usec=0)
    job = live.submit(audio_input, tokenizer_dir)
    wait_state(live, job, {"running"})
    # "running" is written just before the worker starts, its pid just after: wait for both.
    pid = wait_until(lambda: live.job(job).pid, timeout=30)
    text = live.config.read_text().replace("min_free_gib = 20.0", "min_free_gib = 30.0")
    live.config.write_text(text)
    assert live.proc is not None
    live.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "config_reloaded" in live.log_path.read_text(), 10)
    got = [m for _, m in notify.drain(1.0)]
    assert "RELOADING=1" in got and got.index("RELOADING=1") < len(got) - 1
    assert live.state(job) in {"running", "done"}
    assert live.job(job).pid in (pid, None)
    assert wait_state(live, job, {"done", "failed"}) == "done"
    assert (live.tmp / "job.jsonl").read_bytes() == reference_output
    starts = [e for e in live.events() if e.get("event") == "job_started"]
    assert len(starts) == 1
    live.proc.send_signal(signal.SIGTERM)
    assert live.proc.wait(timeout=30) == 0
    assert "STOPPING=1" in [m for _, m in notify.drain(0.5)] + [m for _, m in notify.messages]


def test_sigterm_stops_starting_jobs(live: LiveDaemon, notify: NotifySocket) -> None:
    """After SIGTERM nothing new starts: the daemon exits 0 and queued jobs stay queued."""
    start(live, notify, watchdog_usec=0)
    (live.tmp / "in.jsonl").write_text(json.dumps({"audio": "missing.wav"}) + "\n")
    job = live.submit(live.tmp / "in.jsonl", live.tmp, name="q")
    wait_until(lambda: live.state(job) == "queued")
    assert live.proc is not None
    live.proc.send_signal(signal.SIGTERM)
    live.set_gpus(gpu_entry(0, 80))
    assert live.proc.wait(timeout=30) == 0
    assert live.state(job) == "queued"
