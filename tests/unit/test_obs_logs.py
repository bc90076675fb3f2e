"""Log configuration: one time format, syslog priorities on the journal stream, NO_COLOR."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest
import structlog

from gpuspool import logs
from tests.conftest import Harness, gpu_entry


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Each test configures logging onto its own stream; put the previous set-up back."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    hook = threading.excepthook
    yield
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)
    threading.excepthook = hook
    logging.captureWarnings(False)


@pytest.fixture
def pty_stream() -> Iterator[tuple[TextIO, int]]:
    """A terminal as the log stream, and the fd its output is read from."""
    master, slave = os.openpty()
    stream = open(slave, "w", buffering=1)  # noqa: SIM115 - closed below
    yield stream, master
    stream.close()
    os.close(master)


def read_pty(master: int) -> str:
    return os.read(master, 65536).decode(errors="replace")


def test_iso_timestamp_is_utc_with_milliseconds() -> None:
    """ISO 8601, UTC ('Z'), milliseconds; it parses back to the same instant."""
    stamp = logs.iso_timestamp(1_700_000_000.1234)
    assert stamp == "2023-11-14T22:13:20.123Z"
    assert logs.parse_timestamp(stamp) == pytest.approx(1_700_000_000.123)
    assert logs.parse_timestamp(12.5) == 12.5  # an old job log's epoch ts
    assert logs.parse_timestamp("yesterday") is None
    assert logs.parse_timestamp(True) is None


def test_json_lines_have_the_iso_timestamp(tmp_path: Path) -> None:
    """A daemon log line's ``timestamp`` has the job logs' format."""
    path = tmp_path / "out"
    with open(path, "w") as f:
        logs.configure("json", "info", stream=f)
        logs.get().info("hello", n=1)
    event = json.loads(path.read_text())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", event["timestamp"])


def test_priority_prefix_only_on_the_journal_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With JOURNAL_STREAM naming the stream: <3>/<4>/<6>/<7> on each line, stdlib ones too."""
    path = tmp_path / "out"
    path.touch()
    st = os.stat(path)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    with open(path, "w") as f:
        logs.configure("json", "debug", stream=f)
        log = logs.get()
        log.error("e")
        log.warning("w")
        log.info("i")
        log.debug("d")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("x")
        logging.getLogger("apscheduler").warning("from stdlib")
    lines = path.read_text().splitlines()
    assert [line[:3] for line in lines] == ["<3>", "<4>", "<6>", "<7>", "<3>", "<4>"]
    assert json.loads(lines[4][3:])["exception"].count("RuntimeError") >= 1
    # Another file: the variable is inherited, the stream is not; no prefix.
    other = tmp_path / "other"
    with open(other, "w") as f:
        logs.configure("json", "info", stream=f)
        logs.get().error("e")
    assert json.loads(other.read_text())["event"] == "e"


def test_journal_stream_is_checks_device_and_inode(tmp_path: Path) -> None:
    path = tmp_path / "out"
    path.touch()
    st = os.stat(path)
    with open(path) as f:
        assert logs.journal_stream_is(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not logs.journal_stream_is(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not logs.journal_stream_is(f, {"JOURNAL_STREAM": "garbage"})
        assert not logs.journal_stream_is(f, {})
    assert not logs.journal_stream_is(io.StringIO(), {"JOURNAL_STREAM": "1:2"})


def test_console_colours_unless_no_color(
    pty_stream: tuple[TextIO, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a terminal the console format is coloured; NO_COLOR (non-empty) turns colour off."""
    stream, master = pty_stream
    monkeypatch.delenv("NO_COLOR", raising=False)
    logs.configure("auto", "info", stream=stream)
    logs.get().warning("coloured", n=1)
    assert "\x1b[" in read_pty(master)
    monkeypatch.setenv("NO_COLOR", "1")
    logs.configure("auto", "info", stream=stream)
    logs.get().warning("plain", n=1)
    text = read_pty(master)
    assert "plain" in text and "\x1b[" not in text
    monkeypatch.setenv("NO_COLOR", "")  # empty means unset (no-color.org)
    assert logs.wants_color(stream)


def test_startup_format_follows_a_valid_env_value() -> None:
    assert logs.startup_format({"GPUSPOOL_LOG_FORMAT": "console"}) == "console"
    assert logs.startup_format({"GPUSPOOL_LOG_FORMAT": "xml"}) == "auto"
    assert logs.startup_format({}) == "auto"


def test_a_crashed_thread_is_one_log_line(tmp_path: Path) -> None:
    """A thread's traceback does not reach the stream as bare multi-line text."""
    path = tmp_path / "out"
    with open(path, "w") as f:
        logs.configure("json", "info", stream=f)

        def boom() -> None:
            raise RuntimeError("thread broke")

        thread = threading.Thread(target=boom, name="worker-thread")
        thread.start()
        thread.join()
    logging.captureWarnings(False)
    events = [json.loads(line) for line in path.read_text().splitlines()]
    crashed = next(e for e in events if e["event"] == "thread_failed")
    assert crashed["thread"] == "worker-thread" and "thread broke" in crashed["exception"]
    assert crashed["level"] == "error"


def test_daemon_events_in_a_job_log_use_the_iso_time_of_the_tick(harness: Harness) -> None:
    """The daemon's lines in a job's log carry ``timestamp`` in ISO 8601 UTC (the tick's
    time), like the journal, and no epoch ``ts``."""
    harness.set_gpus([gpu_entry(0, 50)])
    job = harness.submit("a")
    for _ in range(4):
        harness.tick()
    assert harness.settle(job) == "done"
    lines = Path(harness.job(job).log_path).read_text().splitlines()
    daemon = [json.loads(line) for line in lines if '"source": "daemon"' in line]
    started = next(e for e in daemon if e["event"] == "job_started")
    assert "ts" not in started
    at = harness.job(job).started_at  # fake time: a tick's, not the wall clock's
    assert started["timestamp"] == logs.iso_timestamp(at)
    assert re.fullmatch(r"1970-01-01T00:1\d:\d\d\.\d{3}Z", started["timestamp"])
