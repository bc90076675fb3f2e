"""systemd/gpuspool.service: systemd accepts it, and it says what the design needs.

Needs ``systemd-analyze`` (Debian/Ubuntu package ``systemd``); those tests are skipped without it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gpuspool.config import Settings

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "gpuspool.service"
EXEC_START = "/opt/gpuspool/venv/bin/gpuspool"

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (apt-get install systemd)",
)


def _settings(text: str) -> dict[str, list[str]]:
    """Key -> values of every assignment in the unit (all sections)."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def _verify(text: str, tmp_path: Path) -> tuple[int, list[str]]:
    """systemd-analyze verify on ``text`` with ExecStart pointed at an existing binary.

    The real ExecStart is only there once install.sh has built the venv, and verify refuses a
    missing executable; everything else is verified as written.
    """
    assert f"ExecStart={EXEC_START} " in text
    copy = tmp_path / "gpuspool.service"
    copy.write_text(text.replace(f"ExecStart={EXEC_START} ", "ExecStart=/bin/true "))
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "--generators=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify exits 0 even for unknown keys and unparsable values; those are printed as
    # "<file>:<line>: ..." warnings, so any line naming the unit counts as a failure.
    complaints = [line for line in done.stderr.splitlines() if "gpuspool.service" in line]
    return done.returncode, complaints


@needs_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd parses every line of the unit without a warning."""
    rc, complaints = _verify(UNIT.read_text(), tmp_path)
    assert rc == 0
    assert complaints == []


@needs_analyze
def test_verify_reports_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt value and an unknown key are reported."""
    broken = UNIT.read_text().replace("KillMode=mixed", "KillMode=mixd\nKilMode=mixed")
    _, complaints = _verify(broken, tmp_path)
    assert any("kill mode" in c.lower() for c in complaints)
    assert any("KilMode" in c for c in complaints)


@needs_analyze
def test_system_service_filter_keeps_the_user_switch() -> None:
    """SystemCallFilter=@system-service still allows setuid/setgid/setgroups for the job switch."""
    done = subprocess.run(
        ["systemd-analyze", "syscall-filter", "@setuid"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert {"setresuid", "setresgid", "setgroups"} <= set(done.stdout.split())
    service = subprocess.run(
        ["systemd-analyze", "syscall-filter", "@system-service"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "@setuid" in service.stdout.split()


def test_every_setting_is_explained_by_a_comment() -> None:
    """Each assignment belongs to a block of lines that a comment introduces."""
    previous = ""
    for number, line in enumerate(UNIT.read_text().splitlines(), 1):
        is_setting = bool(line) and not line.startswith(("#", "["))
        if is_setting:
            assert previous == "comment", f"line {number} has no comment: {line}"
        else:
            previous = "comment" if line.startswith("#") else "other"


def test_unit_has_the_settings_the_design_needs() -> None:
    """notify + watchdog, restart policy, mixed kill, reload, and GPU devices reachable."""
    s = _settings(UNIT.read_text())
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    assert s["Restart"] == ["on-failure"]
    assert s["RestartSec"] == ["5"]
    assert s["KillMode"] == ["mixed"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["ExecStart"] == [f"{EXEC_START} --config /etc/gpuspool/gpuspool.toml daemon"]
    assert s["WatchdogSec"] == ["60s"]
    assert s["RestartPreventExitStatus"] == ["2"]  # the CLI's exit status for a config error
    assert "gpuspool" in s["StateDirectory"]
    assert s["DevicePolicy"] == ["closed"]
    allowed = {v.split()[0] for v in s["DeviceAllow"]}
    assert {
        "char-nvidia",
        "char-nvidia-frontend",
        "char-nvidiactl",
        "char-nvidia-uvm",
        "/dev/nvidiactl",
        "/dev/nvidia-uvm",
        "/dev/nvidia-uvm-tools",
        "char-nvidia-caps",
    } <= allowed
    assert s.get("PrivateDevices", ["no"]) == ["no"]
    caps = set(s["CapabilityBoundingSet"][0].split())
    assert {"CAP_SETUID", "CAP_SETGID", "CAP_KILL"} <= caps
    assert "CAP_SYS_ADMIN" not in caps and "CAP_DAC_OVERRIDE" not in caps


def test_ordering_on_a_passive_target_also_pulls_it_in() -> None:
    """After=network-online.target alone orders against a target nothing may start
    (systemd.special(7)): each such After= has its Wants=."""
    s = _settings(UNIT.read_text())
    assert "network-online.target" in s["After"]
    assert "network-online.target" in s.get("Wants", [])


def test_stop_timeout_exceeds_the_job_grace_period() -> None:
    """TimeoutStopSec leaves time after stop_grace_s (SIGTERM to SIGKILL for jobs)."""
    value = _settings(UNIT.read_text())["TimeoutStopSec"][0]
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match is not None
    seconds = int(match.group(1)) * (60 if match.group(2) == "min" else 1)
    grace = Settings.model_fields["stop_grace_s"].default
    assert seconds >= grace + 30
