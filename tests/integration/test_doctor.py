"""gpuspool doctor: each check fails on a broken host and passes on a sound one.

Device nodes are real character devices (mknod) and permissions are checked as a real
unprivileged user, so these tests need root.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from rich.console import Console

from gpuspool import doctor
from gpuspool.config import Settings
from gpuspool.doctor import (
    check_config,
    check_device_nodes,
    check_extract_versions,
    check_folders,
    check_nvml,
    check_torch_cuda,
    check_worker_command,
)
from gpuspool.privileges import Identity, identity_for_name
from tests.integration.conftest import TEST_USER, ensure_test_user

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mknod and an unprivileged user"),
]


@dataclass(frozen=True)
class FakeDiagnostics:
    """What gpus.nvml_diagnostics() reports, scripted."""

    ok: bool = True
    driver_version: str | None = "580.65.06"
    nvml_version: str | None = "13.580.65.06"
    device_count: int = 2
    error: str | None = None
    version_mismatch: bool = False


@pytest.fixture(scope="session")
def user() -> Identity:
    """An unprivileged system user (created if missing)."""
    ensure_test_user()
    return identity_for_name(TEST_USER)


@pytest.fixture
def shared() -> Iterator[Path]:
    """A 0755 folder under /tmp the test user can enter."""
    path = Path(tempfile.mkdtemp(prefix="gpuspool-doctor-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def dev(shared: Path) -> Path:
    """A fake /dev with the NVIDIA nodes as real character devices, mode 0666."""
    d = shared / "dev"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    for name, major, minor in [("nvidiactl", 195, 255), ("nvidia0", 195, 0),
                               ("nvidia1", 195, 1), ("nvidia-uvm", 234, 0)]:  # fmt: skip
        os.mknod(d / name, 0o020000 | 0o666, os.makedev(major, minor))
        (d / name).chmod(0o666)
    return d


def _layout(base: Path) -> Settings:
    """Spool and state folders made from deploy/gpuspool.tmpfiles.conf, below ``base``.

    The submit group is mapped to ``root`` so the test needs no extra group.
    """
    mapping = {"/var/spool/gpuspool": base / "spool", "/var/lib/gpuspool": base / "state"}
    for line in (REPO / "deploy/gpuspool.tmpfiles.conf").read_text().splitlines():
        if not line.startswith("d "):
            continue
        _, path, mode, *_ = line.split()
        for prefix, target in mapping.items():
            if path == prefix or path.startswith(prefix + "/"):
                local = target / path[len(prefix) :].lstrip("/")
                local.mkdir(parents=True, exist_ok=True)
                os.chown(local, 0, 0)
                local.chmod(int(mode, 8))
    return Settings(spool_dir=base / "spool", state_dir=base / "state")


# --- NVML ------------------------------------------------------------------------------------


def test_nvml_healthy() -> None:
    """Driver and NVML versions and the GPU count are reported."""
    check = check_nvml(FakeDiagnostics())
    assert check.ok
    assert check.detail == "driver 580.65.06, NVML 13.580.65.06, 2 GPU(s)"


def test_nvml_version_mismatch_says_reboot() -> None:
    """A library/driver mismatch fails and tells to reboot or reload the modules."""
    diag = FakeDiagnostics(ok=False, error="Driver/library version mismatch", version_mismatch=True)
    check = check_nvml(diag)
    assert not check.ok
    assert "differ" in check.detail and check.fix is not None and "reboot" in check.fix


def test_nvml_error_and_no_gpu_fail() -> None:
    """NVML not loading, or seeing no GPU, fails with a fix."""
    broken = check_nvml(FakeDiagnostics(ok=False, error="NVML Shared Library Not Found"))
    assert not broken.ok and "Not Found" in broken.detail and broken.fix
    empty = check_nvml(FakeDiagnostics(device_count=0))
    assert not empty.ok and "no GPU" in empty.detail


def test_nvml_is_optional_for_a_file_gpu_source() -> None:
    """With gpu_source = file:..., a missing NVML is reported but is not a failure."""
    check = check_nvml(FakeDiagnostics(ok=False, error="not found"), required=False)
    assert check.ok and "not needed" in check.detail


# --- device nodes ----------------------------------------------------------------------------


def test_device_nodes_open_to_the_job_user(dev: Path, user: Identity) -> None:
    """0666 nodes pass for an unprivileged job user."""
    check = check_device_nodes(dev, [user])
    assert check.ok, check.detail
    assert "4 nodes" in check.detail


def test_device_nodes_closed_to_the_job_user(dev: Path, user: Identity) -> None:
    """A 0660 root:root GPU node fails, naming the user and the node."""
    (dev / "nvidia1").chmod(0o660)
    check = check_device_nodes(dev, [user])
    assert not check.ok
    assert check.detail == f"{user} may not read {dev / 'nvidia1'}"
    assert check.fix is not None and "usermod -aG" in check.fix


def test_missing_uvm_node_is_reported(dev: Path, user: Identity) -> None:
    """No /dev/nvidia-uvm: fails and says to load nvidia_uvm at boot."""
    (dev / "nvidia-uvm").unlink()
    check = check_device_nodes(dev, [user])
    assert not check.ok and "nvidia-uvm" in check.detail
    assert check.fix is not None and "modules-load.d" in check.fix


def test_a_regular_file_is_not_a_device_node(dev: Path, user: Identity) -> None:
    """A plain file where a node belongs is reported."""
    (dev / "nvidia0").unlink()
    (dev / "nvidia0").write_text("")
    (dev / "nvidia0").chmod(0o666)
    check = check_device_nodes(dev, [user])
    assert not check.ok and "not a character device" in check.detail


# --- folders ---------------------------------------------------------------------------------


def test_folders_as_installed_pass(tmp_path: Path) -> None:
    """The tmpfiles.d layout is exactly what the doctor expects."""
    settings = _layout(tmp_path)
    checks = check_folders(settings, submit_group="root")
    assert [c for c in checks if not c.ok] == []
    assert len(checks) == 7


def test_loosened_drop_folder_fails(tmp_path: Path) -> None:
    """A world-writable incoming/ fails with its mode and the wanted one."""
    settings = _layout(tmp_path)
    settings.incoming_dir.chmod(0o777)
    bad = [c for c in check_folders(settings, submit_group="root") if not c.ok]
    assert [c.name for c in bad] == ["spool incoming folder"]
    assert "777" in bad[0].detail and "want 1730" in bad[0].detail
    assert bad[0].fix is not None and "chmod 1730" in bad[0].fix


def test_missing_and_foreign_owned_folders_fail(tmp_path: Path, user: Identity) -> None:
    """A missing rejected/ and an accepted/ owned by a user are both reported."""
    settings = _layout(tmp_path)
    settings.rejected_dir.rmdir()
    os.chown(settings.accepted_dir, user.uid, 0)
    bad = {c.name: c.detail for c in check_folders(settings, submit_group="root") if not c.ok}
    assert set(bad) == {"spool rejected folder", "spool accepted folder"}
    assert "does not exist" in bad["spool rejected folder"]
    assert TEST_USER in bad["spool accepted folder"]


def test_missing_submit_group_fails(tmp_path: Path) -> None:
    """Without the submitters' group there is a finding that says how to create it."""
    settings = _layout(tmp_path)
    checks = check_folders(settings, submit_group="no-such-group-gpuspool")
    group = [c for c in checks if c.name.startswith("group")]
    assert len(group) == 1 and not group[0].ok


# --- config and worker ------------------------------------------------------------------------


def test_config_errors_are_reported(tmp_path: Path) -> None:
    """A config that does not load fails with the loader's message; a good one passes."""
    bad = tmp_path / "bad.toml"
    bad.write_text("poll_interval_s = -1\n")
    check = check_config(Settings(), bad)
    assert not check.ok and "poll_interval_s" in check.detail
    good = tmp_path / "good.toml"
    good.write_text("poll_interval_s = 2.0\n")
    assert check_config(Settings(), good).ok


def test_metrics_address_must_be_loopback() -> None:
    """A metrics address off loopback is a config problem with the fix named; loopback passes."""
    check = check_config(Settings(metrics_address="0.0.0.0:9404"), None)
    assert not check.ok and check.fix is not None and "loopback" in check.fix
    assert check_config(Settings(metrics_address="127.0.0.1:9404"), None).ok


def test_fallback_user_must_exist_and_not_be_root(user: Identity) -> None:
    """fallback_user naming root or nobody known fails; an ordinary user passes."""
    assert not check_config(Settings(fallback_user="root"), None).ok
    assert not check_config(Settings(fallback_user="no-such-user-gpuspool"), None).ok
    assert check_config(Settings(fallback_user=TEST_USER), None).ok


def test_worker_interpreter_must_be_reachable_for_job_users(user: Identity, shared: Path) -> None:
    """A worker under a private folder fails for the job user; a public one passes."""
    private = shared / "private"
    private.mkdir(mode=0o700)
    python = private / "python"
    python.symlink_to(sys.executable)
    settings = Settings(worker_command=[str(python), "-m", "gpuspool.extract"])
    check = check_worker_command(settings, [user])
    assert not check.ok and "may not enter" in check.detail
    public = Settings(worker_command=["/bin/sh", "-c", "true"])
    assert check_worker_command(public, [user]).ok


# --- extraction environment -------------------------------------------------------------------


def test_pinned_versions_pass_and_others_fail() -> None:
    """Exact pins pass; a different version and a missing package fail, with a pip fix."""
    pytest_version = importlib.metadata.version("pytest")
    assert check_extract_versions(sys.executable, {"pytest": pytest_version}).ok
    check = check_extract_versions(
        sys.executable, {"pytest": "0.0.1", "surely-not-installed-gpuspool": "1.0"}
    )
    assert not check.ok
    assert f"pytest {pytest_version} (need 0.0.1)" in check.detail
    assert "surely-not-installed-gpuspool missing (need 1.0)" in check.detail
    assert check.fix is not None and "'pytest==0.0.1'" in check.fix


def test_versions_are_read_in_another_interpreter(tmp_path: Path) -> None:
    """For a worker interpreter other than this one, versions come from that interpreter."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    pytest_version = importlib.metadata.version("pytest")
    check = check_extract_versions(python, {"pytest": pytest_version})
    assert not check.ok and "pytest missing" in check.detail


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed")
def test_torch_probe_reports_cuda() -> None:
    """torch is probed in a child: CUDA availability decides, unless the worker uses cpu."""
    import json

    had_torch = "torch" in sys.modules  # other tests in the same run may have imported it

    probe = subprocess.run(
        [sys.executable, "-c", "import json, torch; print(json.dumps(torch.cuda.is_available()))"],
        capture_output=True, text=True, timeout=180, check=True,
    )  # fmt: skip
    has_cuda = json.loads(probe.stdout)
    check = check_torch_cuda(sys.executable)
    assert check.ok is has_cuda
    if not has_cuda:
        assert "is_available() is False" in check.detail
    assert check_torch_cuda(sys.executable, need_cuda=False).ok
    if not had_torch:
        assert "torch" not in sys.modules  # never imported by the doctor itself


def test_torch_probe_times_out(tmp_path: Path) -> None:
    """An interpreter that hangs is reported after the timeout, not waited for."""
    hang = tmp_path / "python-hangs"
    hang.write_text("#!/bin/sh\nexec sleep 30\n")
    hang.chmod(0o755)
    check = check_torch_cuda(str(hang), timeout_s=0.5)
    assert not check.ok and "no answer within 0.5 s" in check.detail


def test_torch_probe_without_interpreter(tmp_path: Path) -> None:
    """A worker interpreter that does not exist is reported."""
    check = check_torch_cuda(str(tmp_path / "nope"))
    assert not check.ok and "cannot run it" in check.detail


# --- all together -----------------------------------------------------------------------------


def test_main_exits_zero_on_a_sound_host(dev: Path, user: Identity, shared: Path) -> None:
    """Everything in order: every line has a check mark and the exit status is 0."""
    settings = _layout(shared / "host")
    settings = settings.model_copy(
        update={"worker_command": ["/bin/sh", "-c", "true"], "worker_device": "cpu"}
    )
    out = io.StringIO()
    pins = {"pytest": importlib.metadata.version("pytest")}
    code = doctor.main(
        settings, console=Console(file=out, width=200), diagnostics=FakeDiagnostics(),
        dev_dir=dev, users=[user], python=sys.executable, pins=pins, submit_group="root",
    )  # fmt: skip
    text = out.getvalue()
    if importlib.util.find_spec("torch") is None:
        assert code == 1 and "torch and CUDA" in text
        return
    assert code == 0, text
    assert "✗" not in text and "All checks passed." in text


def test_main_exits_non_zero_and_prints_fixes(dev: Path, user: Identity, shared: Path) -> None:
    """A mismatch and a closed node: exit 1, each with what is wrong and how to fix it."""
    settings = _layout(shared / "host")
    (dev / "nvidia0").chmod(0o600)
    out = io.StringIO()
    code = doctor.main(
        settings, console=Console(file=out, width=200),
        diagnostics=FakeDiagnostics(ok=False, error="version mismatch", version_mismatch=True),
        dev_dir=dev, users=[user], python=sys.executable, pins={}, submit_group="root",
        torch_timeout_s=0.01,
    )  # fmt: skip
    text = out.getvalue()
    assert code == 1
    assert "✗ NVML and driver" in text and "reboot" in text
    assert f"✗ GPU device nodes: {user} may not read {dev / 'nvidia0'}" in text
    assert text.count("fix:") >= 2


def test_simulated_gpus_make_device_nodes_optional(tmp_path: Path, user: Identity) -> None:
    """With a file gpu_source, missing /dev/nvidia* nodes are reported, not a problem."""
    empty = tmp_path / "dev"
    empty.mkdir()
    check = check_device_nodes(empty, [user], required_by="gpu_source is file:/x")
    assert (
        check.ok and "missing" in check.detail and "not needed: gpu_source is file" in check.detail
    )
    assert not check_device_nodes(empty, [user]).ok


def test_cli_doctor_names_the_config_it_was_given(tmp_path: Path) -> None:
    """`gpuspool --config PATH doctor` says the config was loaded from PATH; a simulated GPU
    source passes the NVML and device-node checks."""
    cfg = tmp_path / "gpuspool.toml"
    cfg.write_text(
        f'spool_dir = "{tmp_path / "spool"}"\nstate_dir = "{tmp_path / "state"}"\n'
        f'gpu_source = "file:{tmp_path / "gpus.json"}"\n'
        'worker_command = ["/nonexistent/python", "-m", "gpuspool.extract"]\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "gpuspool.cli", "--config", str(cfg), "doctor"],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "COLUMNS": "300"},
    )  # fmt: skip
    assert f"✓ config: loaded from {cfg}" in done.stdout, done.stdout
    assert "✓ GPU device nodes" in done.stdout and "✓ NVML" in done.stdout, done.stdout
