"""sd_notify over a real AF_UNIX datagram socket, as systemd's service manager would receive it."""

from __future__ import annotations

import os
import select
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpuspool.systemd import Notifier


class Listener:
    """The service manager's end: a bound datagram socket that collects messages."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    def receive(self) -> list[str]:
        """One datagram, split into its assignments."""
        data = self.sock.recv(4096)
        return data.decode().split("\n")

    def pending(self) -> bool:
        """True if a datagram is waiting."""
        readable, _, _ = select.select([self.sock], [], [], 0)
        return bool(readable)


@pytest.fixture
def path_listener(tmp_path: Path) -> Iterator[Listener]:
    """A datagram socket bound to a filesystem path."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        yield Listener(sock, str(path))


@pytest.fixture
def abstract_listener() -> Iterator[Listener]:
    """A datagram socket bound to a Linux abstract name (``@name`` in NOTIFY_SOCKET)."""
    name = f"gpuspool-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        yield Listener(sock, "@" + name)


def test_ready_reaches_a_path_socket(path_listener: Listener) -> None:
    """READY=1 arrives as one datagram on a filesystem notify socket."""
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path_listener.env_value})
    assert notifier.enabled
    assert notifier.ready() is True
    assert path_listener.receive() == ["READY=1"]


def test_at_sign_means_abstract_namespace(abstract_listener: Listener) -> None:
    """A leading '@' addresses the abstract socket of that name."""
    notifier = Notifier.from_env({"NOTIFY_SOCKET": abstract_listener.env_value})
    assert notifier.status("queued=3 running=1 gpus_free=2")
    assert abstract_listener.receive() == ["STATUS=queued=3 running=1 gpus_free=2"]


def test_status_is_kept_on_one_line(path_listener: Listener) -> None:
    """A multi-line status is flattened so it cannot inject other assignments."""
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path_listener.env_value})
    notifier.status("two jobs\nREADY=1")
    assert path_listener.receive() == ["STATUS=two jobs READY=1"]


def test_watchdog_stopping_and_extend_timeout(path_listener: Listener) -> None:
    """WATCHDOG=1, STOPPING=1 and EXTEND_TIMEOUT_USEC are sent verbatim."""
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path_listener.env_value})
    notifier.watchdog()
    notifier.stopping()
    notifier.extend_timeout(2.5)
    assert path_listener.receive() == ["WATCHDOG=1"]
    assert path_listener.receive() == ["STOPPING=1"]
    assert path_listener.receive() == ["EXTEND_TIMEOUT_USEC=2500000"]


def test_reloading_carries_the_monotonic_clock(path_listener: Listener) -> None:
    """RELOADING=1 comes with MONOTONIC_USEC read from CLOCK_MONOTONIC at send time."""
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path_listener.env_value})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = path_listener.receive()
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_without_notify_socket_nothing_is_sent(path_listener: Listener) -> None:
    """No NOTIFY_SOCKET: disabled, every call returns False, nothing reaches any socket."""
    notifier = Notifier.from_env({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False
    assert notifier.watchdog_interval_s is None
    assert not path_listener.pending()


def test_a_vanished_socket_does_not_raise(tmp_path: Path) -> None:
    """Sending to a socket nobody listens on reports False instead of raising."""
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.enabled
    assert notifier.ready() is False


def test_unusable_address_disables_the_notifier() -> None:
    """A relative path or a bare '@' is not an address: the notifier is disabled."""
    assert not Notifier.from_env({"NOTIFY_SOCKET": "relative.sock"}).enabled
    assert not Notifier.from_env({"NOTIFY_SOCKET": "@"}).enabled


def test_watchdog_interval_is_half_of_watchdog_usec(path_listener: Listener) -> None:
    """WATCHDOG_USEC=30 s gives a 15 s keep-alive interval."""
    env = {"NOTIFY_SOCKET": path_listener.env_value, "WATCHDOG_USEC": "30000000"}
    assert Notifier.from_env(env).watchdog_interval_s == 15.0


def test_watchdog_pid_of_another_process_disables_the_interval(path_listener: Listener) -> None:
    """WATCHDOG_PID naming another process means the watchdog is not ours."""
    env = {"NOTIFY_SOCKET": path_listener.env_value, "WATCHDOG_USEC": "30000000"}
    mine = Notifier.from_env({**env, "WATCHDOG_PID": str(os.getpid())})
    other = Notifier.from_env({**env, "WATCHDOG_PID": str(os.getpid() + 1)})
    assert mine.watchdog_interval_s == 15.0
    assert other.watchdog_interval_s is None


def test_malformed_watchdog_values_disable_the_interval(path_listener: Listener) -> None:
    """Non-numeric or non-positive WATCHDOG_USEC/WATCHDOG_PID are ignored, not fatal."""
    base = {"NOTIFY_SOCKET": path_listener.env_value}
    for extra in (
        {"WATCHDOG_USEC": "soon"},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "me"},
    ):
        assert Notifier.from_env({**base, **extra}).watchdog_interval_s is None


def test_from_env_reads_os_environ_by_default(
    path_listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without an argument the process environment is used."""
    monkeypatch.setenv("NOTIFY_SOCKET", path_listener.env_value)
    Notifier.from_env().ready()
    assert path_listener.receive() == ["READY=1"]
