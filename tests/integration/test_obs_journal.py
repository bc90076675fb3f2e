"""The exact bytes the daemon writes under systemd: a syslog priority on every journal line.

journald cannot run in a container, so these tests do what systemd does instead: the daemon's
stdout is a file and ``JOURNAL_STREAM`` names that file's device and inode, exactly as systemd
sets it for a unit's stdout. journald reads the ``<N>`` prefix of each line as its PRIORITY
(``SyslogLevelPrefix=yes``, the default) and strips it, so ``journalctl -o cat`` shows the JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import gpu_entry, wait_until
from tests.integration.conftest import LiveDaemon


def journal_env(stdout_file: Path) -> dict[str, str]:
    """Our environment plus ``JOURNAL_STREAM`` naming ``stdout_file``, as systemd would."""
    stdout_file.touch()
    st = os.stat(stdout_file)
    return {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def prefixed(raw: bytes) -> list[tuple[int, dict[str, object]]]:
    """Each line as (priority, JSON object); fails on a line without ``<N>`` and JSON after it."""
    out = []
    for line in raw.decode().splitlines():
        assert line[:1] == "<" and line[2:3] == ">" and line[1].isdigit(), line
        out.append((int(line[1]), json.loads(line[3:])))
    return out


def test_daemon_lines_carry_their_priority(live: LiveDaemon) -> None:
    """Errors are <3>, warnings <4>, info <6>, and the rest of each line is plain JSON."""
    live.set_gpus(gpu_entry(0, 50), {**gpu_entry(1, 0), "error": "GPU is lost"})
    live.start(env=journal_env(live.log_path))
    # A job file that is not valid JSON: rejected with a warning.
    incoming = live.tmp / "spool" / "incoming"
    (incoming / "broken.json").write_bytes(b"{not json")
    wait_until(lambda: b"job_rejected" in live.log_path.read_bytes(), timeout=30)
    assert live.stop() == 0
    lines = prefixed(live.log_path.read_bytes())
    by_event = {event["event"]: prio for prio, event in lines}
    assert by_event["gpu_error"] == 3
    assert by_event["job_rejected"] == 4
    assert by_event["daemon_started"] == 6
    assert by_event["daemon_stopped"] == 6
    for prio, event in lines:  # the priority and the JSON level agree on every line
        assert prio == {"error": 3, "warning": 4, "info": 6, "debug": 7}[str(event["level"])]
        assert str(event["timestamp"]).endswith("Z")


def test_no_prefix_when_stdout_is_not_the_journal_stream(live: LiveDaemon) -> None:
    """A stdout that is not the stream JOURNAL_STREAM names (a redirect) gets bare JSON."""
    env = journal_env(live.tmp / "elsewhere.log")
    live.start(env=env)
    assert live.stop() == 0
    lines = live.log_path.read_text().splitlines()
    assert lines and all(json.loads(line)["event"] for line in lines)


def _daemon_on_journal(config: Path, out: Path) -> tuple[int, Path]:
    """``gpuspool daemon`` with its stdout on a file systemd would name in JOURNAL_STREAM: its
    exit code and that file."""
    with open(out, "ab") as f:
        rc = subprocess.run(
            [sys.executable, "-m", "gpuspool.cli", "--config", str(config), "daemon"],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=journal_env(out),
            timeout=60,
        ).returncode
    return rc, out


def test_bad_config_is_one_json_error_line(tmp_path: Path) -> None:
    """A config error at start-up: exit 2 and one ``<3>`` JSON line naming the file and field."""
    config = tmp_path / "gpuspool.toml"
    config.write_text('min_free_gib = "auto"\n')
    rc, out = _daemon_on_journal(config, tmp_path / "stdout")
    assert rc == 2
    [(prio, event)] = prefixed(out.read_bytes())
    assert prio == 3
    assert event["event"] == "config_invalid"
    assert event["config"] == str(config)
    assert event["field"] == "min_free_gib"
    assert event["error"].startswith("must be a valid number (got 'auto')")


def test_bad_config_piped_is_plain_json(tmp_path: Path) -> None:
    """Piped (``journalctl -o cat | jq`` sees the same): one JSON line, no pydantic text."""
    config = tmp_path / "gpuspool.toml"
    config.write_text("poll_intervall_s = 3\n")
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    proc = subprocess.run(
        [sys.executable, "-m", "gpuspool.cli", "--config", str(config), "daemon"],
        capture_output=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 2
    [line] = (proc.stdout + proc.stderr).decode().splitlines()
    event = json.loads(line)
    assert event["field"] == "poll_intervall_s"
    assert event["error"].startswith("unknown setting")
    assert "pydantic" not in line and "validation error" not in line


def test_start_up_failure_is_one_json_error_line(tmp_path: Path) -> None:
    """A failure past the config (the spool folder cannot be created): exit 1 and one ``<3>``
    line with the traceback inside its JSON, not a bare traceback."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    config = tmp_path / "gpuspool.toml"
    gpus = tmp_path / "gpus.json"
    gpus.write_text("[]")
    config.write_text(
        f'spool_dir = "{blocker / "spool"}"\nstate_dir = "{tmp_path / "state"}"\n'
        f'gpu_source = "file:{gpus}"\nlog_format = "json"\n'
    )
    rc, out = _daemon_on_journal(config, tmp_path / "stdout")
    assert rc == 1
    [(prio, event)] = prefixed(out.read_bytes())
    assert prio == 3 and event["event"] == "daemon_failed"
    assert "not-a-folder" in str(event["error"]) and "Traceback" in str(event["exception"])
