"""sd_notify: tell systemd we are ready, what we are doing, and that we are alive.

The protocol is one ``AF_UNIX``/``SOCK_DGRAM`` datagram of newline-separated ``KEY=VALUE``
assignments to the socket named by ``$NOTIFY_SOCKET``; a leading ``@`` names a Linux abstract
socket (sd_notify(3)). systemd documents the protocol as stable and publishes a self-contained
Python example of it (``man/notify-selfcontained-example.py``); this module follows that example
so the daemon needs no binding to libsystemd.

Without ``$NOTIFY_SOCKET`` (not started by systemd, or ``Type=`` other than notify) every call is
a no-op. Sending is best effort: a failed send returns ``False`` and never raises, because a
daemon must not die because its supervisor went away.

Jobs never inherit ``NOTIFY_SOCKET``/``WATCHDOG_*`` (a child could otherwise send READY or
WATCHDOG in the daemon's name): a job's environment is an allow-list (``Daemon._job_env``).

Owns: the notify socket. Must not import anything of the daemon.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping


def _socket_address(value: str) -> str | None:
    """Translate ``$NOTIFY_SOCKET`` into an address for ``socket.connect``; None if unusable."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        # Abstract namespace: the name starts with a NUL byte instead of "@".
        return "\0" + value[1:]
    # systemd >= 254 may also pass "vsock:CID:PORT" (VM guests); not used on a GPU host.
    return None


def _parse_watchdog_usec(environ: Mapping[str, str], pid: int) -> int | None:
    """``WATCHDOG_USEC`` if it is meant for process ``pid`` (sd_watchdog_enabled(3))."""
    raw = environ.get("WATCHDOG_USEC")
    if raw is None:
        return None
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    raw_pid = environ.get("WATCHDOG_PID")
    if raw_pid is not None:
        try:
            if int(raw_pid) != pid:
                return None  # the watchdog belongs to another process (we were forked)
        except ValueError:
            return None
    return usec


class Notifier:
    """Sends notifications to the service manager; every method is a no-op when disabled."""

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        self._address = address
        self._watchdog_usec = watchdog_usec

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """Build from ``environ`` (default ``os.environ``); does not modify it."""
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        address = _socket_address(raw) if raw else None
        return cls(address, watchdog_usec=_parse_watchdog_usec(env, os.getpid()))

    @property
    def enabled(self) -> bool:
        """True when a notify socket was given."""
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to send ``WATCHDOG=1``: half of ``WATCHDOG_USEC``; None without a watchdog."""
        if self._address is None or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram. True if sent; False if disabled or failed."""
        if self._address is None:
            return False
        payload = "\n".join(assignments).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self._address)
                sock.sendall(payload)
        except OSError:
            return False
        return True

    def ready(self) -> bool:
        """Startup (or a reload) is complete: ``READY=1``."""
        return self.notify("READY=1")

    def status(self, text: str) -> bool:
        """One line shown by ``systemctl status``: ``STATUS=...`` (newlines become spaces)."""
        return self.notify("STATUS=" + " ".join(text.splitlines()))

    def watchdog(self) -> bool:
        """Keep-alive: ``WATCHDOG=1``. Send only after a main-loop iteration has completed."""
        return self.notify("WATCHDOG=1")

    def reloading(self) -> bool:
        """A reload began: ``RELOADING=1`` with ``MONOTONIC_USEC``; send ``ready()`` when done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        """Shutdown began: ``STOPPING=1``."""
        return self.notify("STOPPING=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before a start/stop timeout: ``EXTEND_TIMEOUT_USEC=``."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")
