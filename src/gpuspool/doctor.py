"""``gpuspool doctor``: check the host and say what is wrong and how to fix it.

Each check returns a :class:`Check` (name, ok, detail, fix). Checked: NVML and the driver
(including a library/driver version mismatch), the ``/dev/nvidia*`` nodes for the users jobs run
as, the spool and state folders (owners and modes as ``deploy/install.sh`` makes them), the
config, the worker's interpreter, and the extraction environment (pinned qwen-tts and
transformers, torch with CUDA).

Must not import torch or the worker: package versions are read with ``importlib.metadata`` and
torch is probed in a child interpreter with a timeout (a broken CUDA setup can hang an import).
"""

from __future__ import annotations

import contextlib
import grp
import importlib.metadata
import json
import os
import pwd
import stat
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.markup import escape

from gpuspool.config import ConfigError, Settings, load_settings
from gpuspool.privileges import (
    Identity,
    PrivilegeError,
    check_access,
    current_identity,
    identity_for_name,
)

#: The versions the official extraction pipeline uses; the codes depend on them.
EXTRACT_PINS: Mapping[str, str] = {"qwen-tts": "0.1.1", "transformers": "4.57.3"}
#: The group whose members may submit jobs (deploy/gpuspool.sysusers.conf).
SUBMIT_GROUP = "gpuspool-submit"
#: The service user the daemon runs as when it is not root.
SERVICE_USER = "gpuspool"
#: Seconds allowed for ``import torch`` plus CUDA initialisation in the probe.
TORCH_PROBE_TIMEOUT_S = 180.0

_TORCH_PROBE = (
    "import json, torch\n"
    "ok = torch.cuda.is_available()\n"
    "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, 'available': ok,"
    " 'devices': torch.cuda.device_count() if ok else 0}))\n"
)
_VERSIONS_PROBE = (
    "import importlib.metadata as m, json, sys\n"
    "out = {}\n"
    "for name in sys.argv[1:]:\n"
    "    try:\n"
    "        out[name] = m.version(name)\n"
    "    except m.PackageNotFoundError:\n"
    "        out[name] = None\n"
    "print(json.dumps(out))\n"
)


@dataclass(frozen=True)
class Check:
    """One finding: what was checked, whether it is fine, what was seen, and how to fix it."""

    name: str
    ok: bool
    detail: str
    fix: str | None = None


class Diagnostics(Protocol):
    """What ``gpuspool.gpus.nvml_diagnostics()`` returns."""

    @property
    def ok(self) -> bool: ...
    @property
    def driver_version(self) -> str | None: ...
    @property
    def nvml_version(self) -> str | None: ...
    @property
    def device_count(self) -> int: ...
    @property
    def error(self) -> str | None: ...
    @property
    def version_mismatch(self) -> bool: ...


# --- NVML and the driver -----------------------------------------------------------------------


def check_nvml(diagnostics: Diagnostics, *, required: bool = True) -> Check:
    """The driver answers through NVML, its versions agree, and it sees at least one GPU."""
    name = "NVML and driver"
    if diagnostics.version_mismatch:
        return Check(
            name,
            False,
            f"the NVML library and the loaded kernel driver differ: {diagnostics.error}",
            "The driver was upgraded but the old kernel module is still loaded: reboot, or stop "
            "everything using the GPUs and reload the nvidia modules (rmmod/modprobe).",
        )
    if not diagnostics.ok:
        return Check(
            name,
            not required,
            f"NVML does not work: {diagnostics.error}"
            + ("" if required else " (not needed: gpu_source is not nvml)"),
            "Check that `nvidia-smi` works. If it does not, install or load the NVIDIA driver; "
            "if it works in a shell but not in the service, the unit's DeviceAllow= blocks a node.",
        )
    versions = f"driver {diagnostics.driver_version}, NVML {diagnostics.nvml_version}"
    if diagnostics.device_count == 0:
        return Check(
            name,
            not required,
            f"{versions}, but no GPU is visible",
            "Check `nvidia-smi -L`; a GPU may have fallen off the bus (see `dmesg`).",
        )
    return Check(name, True, f"{versions}, {diagnostics.device_count} GPU(s)")


# --- device nodes ----------------------------------------------------------------------------


def job_users(settings: Settings, submit_group: str = SUBMIT_GROUP) -> list[Identity]:
    """The users jobs run as: the daemon's own user when not root; else the submitters.

    Submitters are the members of ``submit_group`` plus ``fallback_user``; when there are none
    yet, an account-less uid stands for "any user", so only the bits for others count.
    """
    if os.geteuid() != 0:
        return [current_identity()]
    users: list[Identity] = []
    names: list[str] = []
    with contextlib.suppress(KeyError):
        names = list(grp.getgrnam(submit_group).gr_mem)
    if settings.fallback_user:
        names.append(settings.fallback_user)
    for n in dict.fromkeys(names):
        try:
            users.append(identity_for_name(n))
        except PrivilegeError:
            continue
    return users or [Identity(65534, 65534, (65534,), "any user", "/")]


def check_device_nodes(
    dev_dir: Path, users: Sequence[Identity], *, required_by: str | None = None
) -> Check:
    """``/dev/nvidiactl``, ``/dev/nvidia-uvm`` and one node per GPU exist, rw for job users.

    ``required_by``: None when the GPUs are real; else what makes the nodes optional (a
    simulated ``gpu_source``), and missing nodes are then reported, not counted as a problem.
    """
    name = "GPU device nodes"
    gpus = sorted(p for p in dev_dir.glob("nvidia[0-9]*") if p.name[6:].isdigit())
    required = [dev_dir / "nvidiactl", dev_dir / "nvidia-uvm"]
    missing = [str(p) for p in required if not p.exists()]
    if not gpus:
        missing.append(f"{dev_dir}/nvidia0 (one node per GPU)")
    if missing and required_by is not None:
        return Check(name, True, f"missing: {', '.join(missing)} (not needed: {required_by})")
    if missing:
        return Check(
            name,
            False,
            "missing: " + ", ".join(missing),
            "Load the driver at boot so the nodes exist before the service starts (the service "
            "cannot load modules): `echo nvidia_uvm > /etc/modules-load.d/nvidia-uvm.conf`, or "
            "run `nvidia-modprobe -u -c=0` once; `nvidia-smi` creates the per-GPU nodes.",
        )
    nodes = [*required, *gpus]
    uvm_tools = dev_dir / "nvidia-uvm-tools"
    if uvm_tools.exists():
        nodes.append(uvm_tools)
    problems = [f"{p} is not a character device" for p in nodes if not _is_char(p)]
    for user in users:
        problems += [r for p in nodes if (r := check_access(user, p, "rw")) is not None]
    if problems:
        groups = sorted({_group_name(p.stat().st_gid) for p in nodes if p.exists()})
        return Check(
            name,
            False,
            "; ".join(problems),
            "Jobs open these nodes as their submitters. Either make them world-rw (the driver "
            "default, NVreg_DeviceFileMode=0666), or add each submitter to the nodes' group "
            f"({', '.join(groups)}): `usermod -aG GROUP NAME`.",
        )
    who = ", ".join(str(u) for u in users)
    return Check(name, True, f"{len(nodes)} nodes, read/write for {who}")


def _is_char(path: Path) -> bool:
    try:
        return stat.S_ISCHR(path.stat().st_mode)
    except OSError:
        return False


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


# --- folders ---------------------------------------------------------------------------------


def check_folders(settings: Settings, submit_group: str = SUBMIT_GROUP) -> list[Check]:
    """Spool and state folders have the owners and modes ``deploy/install.sh`` gives them.

    All belong to the daemon's user (the owner of ``state_dir``, which must be root, the
    service user or whoever runs the doctor); the drop folders belong to ``submit_group``.
    """
    try:
        submit_gid: int | None = grp.getgrnam(submit_group).gr_gid
    except KeyError:
        submit_gid = None
    try:
        owner = settings.state_dir.lstat().st_uid
    except OSError:
        owner = os.geteuid()
    allowed_owners = {0, os.geteuid()}
    with contextlib.suppress(KeyError):
        allowed_owners.add(pwd.getpwnam(SERVICE_USER).pw_uid)
    expected = [
        ("state", settings.state_dir, 0o711, False),
        ("job logs", settings.logs_dir, 0o711, False),
        ("spool", settings.spool_dir, 0o710, True),
        ("spool incoming", settings.incoming_dir, 0o1730, True),
        ("spool tmp", settings.staging_dir, 0o1730, True),
        ("spool accepted", settings.accepted_dir, 0o700, False),
        ("spool rejected", settings.rejected_dir, 0o711, False),
    ]
    checks = []
    for label, path, mode, shared in expected:
        group = submit_group if shared else _group_name(_gid_or(path, 0))
        want = f"{mode:o} {_user_name(owner)}:{group}"
        fix = (
            f"Run deploy/install.sh again (it repairs owners and modes), or: "
            f"chown {_user_name(owner)}:{group} {path} && chmod {mode:o} {path}"
        )
        gid = submit_gid if shared else None
        checks.append(_check_folder(f"{label} folder", path, mode, owner, gid, want, fix))
    if owner not in allowed_owners:
        checks[0] = Check(
            checks[0].name,
            False,
            f"{settings.state_dir} belongs to {_user_name(owner)}, which is neither root nor "
            f"the service user {SERVICE_USER}",
            f"chown -R root:root {settings.state_dir} (or {SERVICE_USER} for a service-user "
            "install) and run deploy/install.sh again",
        )
    if submit_gid is None:
        checks.append(
            Check(
                f"group {submit_group}",
                False,
                f"the submitters' group {submit_group} does not exist",
                "Run deploy/install.sh (or systemd-sysusers), then `usermod -aG "
                f"{submit_group} NAME` for each user who may submit jobs.",
            )
        )
    return checks


def _gid_or(path: Path, default: int) -> int:
    try:
        return path.lstat().st_gid
    except OSError:
        return default


def _check_folder(
    name: str, path: Path, mode: int, owner: int, gid: int | None, want: str, fix: str
) -> Check:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return Check(name, False, f"{path} does not exist (want {want})", fix)
    except OSError as exc:
        return Check(name, False, f"{path}: {exc.strerror}", fix)
    if not stat.S_ISDIR(st.st_mode):
        return Check(name, False, f"{path} is not a directory (a link or a file)", fix)
    have = f"{stat.S_IMODE(st.st_mode):o} {_user_name(st.st_uid)}:{_group_name(st.st_gid)}"
    ok = (
        stat.S_IMODE(st.st_mode) == mode
        and st.st_uid == owner
        and (gid is None or st.st_gid == gid)
    )
    if ok:
        return Check(name, True, f"{path}: {have}")
    return Check(name, False, f"{path}: {have}, want {want}", fix)


# --- config and worker ------------------------------------------------------------------------


def check_config(settings: Settings, config_path: Path | None) -> Check:
    """The config file loads, ``fallback_user`` (if set) is an existing non-root user, and
    ``metrics_address`` (if set) is on loopback."""
    name = "config"
    if config_path is not None:
        try:
            load_settings(config_path)
        except ConfigError as exc:
            return Check(name, False, str(exc), f"Fix {config_path} (see config/gpuspool.toml).")
    if settings.fallback_user is not None:
        try:
            fallback = identity_for_name(settings.fallback_user)
        except PrivilegeError as exc:
            return Check(
                name, False, f"fallback_user: {exc.reason}", "Create the user or unset it."
            )
        if fallback.uid == 0:
            return Check(
                name, False, "fallback_user is root", "Jobs never run as root: use another user."
            )
    if settings.metrics_address:
        from gpuspool.metrics import MetricsAddressError, parse_loopback

        try:
            parse_loopback(settings.metrics_address)
        except MetricsAddressError as exc:
            return Check(name, False, str(exc), "Use a loopback address such as 127.0.0.1:9404.")
    where = str(config_path) if config_path is not None else "defaults and environment"
    return Check(name, True, f"loaded from {where}")


def check_ledger(settings: Settings) -> Check | None:
    """On a shared ledger (``ledger_url = "postgresql://…"``), whether this host reaches the
    database, and which hosts heartbeat there; None on a single host (SQLite)."""
    if not settings.ledger_is_shared:
        return None
    from gpuspool.ledger import LedgerError
    from gpuspool.ledger_api import ClusterLedger, open_ledger

    name = "shared ledger"
    try:
        ledger = open_ledger(settings, readonly=True)
    except (LedgerError, ConfigError) as exc:
        why = " ".join(str(exc).split())
        if "start the daemon once" in why:  # a new database: the daemon's first start migrates
            return Check(name, True, why)
        return Check(
            name, False, why,
            "See docs/cluster.md (Setting up PostgreSQL, Configuring each host): pg_hba.conf"
            " must let this host in; the password goes in root's ~/.pgpass or PGPASSWORD;"
            " sslmode=verify-full needs the server's CA in root's ~/.postgresql/root.crt.",
        )  # fmt: skip
    try:
        hosts = list(ledger.hosts()) if isinstance(ledger, ClusterLedger) else []
    finally:
        ledger.close()
    seen = ", ".join(f"{h.name} ({h.age_s:.0f} s ago)" for h in hosts) or "none yet"
    return Check(name, True, f"{settings.ledger_shown}: hosts' last heartbeats: {seen}")


def worker_python(settings: Settings) -> str:
    """The interpreter that runs the extraction worker (the first word of worker_command)."""
    first = settings.worker_command[0] if settings.worker_command else sys.executable
    return first if Path(first).name.startswith("python") else sys.executable


def check_worker_command(settings: Settings, users: Sequence[Identity]) -> Check:
    """The worker's program exists and every user jobs run as may execute it."""
    name = "worker command"
    program = Path(settings.worker_command[0]) if settings.worker_command else None
    if program is None or not program.is_absolute():
        return Check(
            name, False, f"worker_command must start with an absolute path: {program}", None
        )
    problems = [r for u in users if (r := check_access(u, program, "x")) is not None]
    if problems:
        return Check(
            name,
            False,
            "; ".join(problems),
            "Jobs run as their submitters, so the worker's interpreter and every folder above it "
            "must be open to them (a Python under /root is not): install into /opt/gpuspool/venv "
            "from a system Python (deploy/install.sh).",
        )
    return Check(name, True, f"{program} is executable by the job users")


# --- extraction environment -------------------------------------------------------------------


def check_extract_versions(python: str, pins: Mapping[str, str] = EXTRACT_PINS) -> Check:
    """The worker's environment has exactly the pinned qwen-tts and transformers."""
    name = "extraction packages"
    found: dict[str, str | None]
    if python == sys.executable:
        found = {}
        for pkg in pins:
            try:
                found[pkg] = importlib.metadata.version(pkg)
            except importlib.metadata.PackageNotFoundError:
                found[pkg] = None
    else:
        result = _run_json([python, "-c", _VERSIONS_PROBE, *pins], timeout_s=60)
        if isinstance(result, str):
            return Check(name, False, f"{python}: {result}", None)
        found = {k: (v if isinstance(v, str) else None) for k, v in result.items()}
    wrong = [
        f"{pkg} {found.get(pkg) or 'missing'} (need {want})"
        for pkg, want in pins.items()
        if found.get(pkg) != want
    ]
    if wrong:
        reqs = " ".join(f"'{pkg}=={want}'" for pkg, want in pins.items())
        return Check(
            name,
            False,
            "; ".join(wrong) + f" in {python}",
            f"The codes depend on these versions: {python} -m pip install {reqs}",
        )
    return Check(name, True, ", ".join(f"{p} {v}" for p, v in found.items()))


def check_torch_cuda(
    python: str, *, need_cuda: bool = True, timeout_s: float = TORCH_PROBE_TIMEOUT_S
) -> Check:
    """torch imports in the worker's interpreter and (unless worker_device is cpu) sees CUDA."""
    name = "torch and CUDA"
    result = _run_json([python, "-c", _TORCH_PROBE], timeout_s=timeout_s)
    if isinstance(result, str):
        return Check(
            name,
            False,
            f"probing torch with {python}: {result}",
            f"Install the extraction extra: {python} -m pip install 'gpuspool[extract]'",
        )
    detail = f"torch {result.get('torch')}, CUDA {result.get('cuda')}"
    if result.get("available"):
        return Check(name, True, f"{detail}, {result.get('devices')} device(s)")
    if not need_cuda:
        return Check(name, True, f"{detail}, no CUDA (not needed: worker_device is cpu)")
    return Check(
        name,
        False,
        f"{detail}: torch.cuda.is_available() is False",
        "Install a CUDA build of torch that this driver supports (CUDA None means a CPU-only "
        "wheel), and check the NVML and device-node findings above.",
    )


def _run_json(argv: list[str], *, timeout_s: float) -> dict[str, object] | str:
    """Run ``argv``; its last stdout line parsed as a JSON object, or the problem in words."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return f"no answer within {timeout_s:g} s"
    except OSError as exc:
        return f"cannot run it: {exc.strerror}"
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"exit status {done.returncode}: {tail}"
    try:
        value = json.loads(lines[-1])
    except json.JSONDecodeError:
        return f"unexpected output: {lines[-1][:200]}"
    return value if isinstance(value, dict) else f"unexpected output: {lines[-1][:200]}"


# --- all together -----------------------------------------------------------------------------


def run_checks(
    settings: Settings,
    *,
    diagnostics: Diagnostics | None = None,
    config_path: Path | None = None,
    dev_dir: Path = Path("/dev"),
    users: Sequence[Identity] | None = None,
    python: str | None = None,
    pins: Mapping[str, str] = EXTRACT_PINS,
    submit_group: str = SUBMIT_GROUP,
    torch_timeout_s: float = TORCH_PROBE_TIMEOUT_S,
) -> list[Check]:
    """Every check, in the order a person would fix them (driver first, torch last)."""
    if diagnostics is None:
        diagnostics = _nvml_diagnostics()
    if users is None:
        users = job_users(settings, submit_group)
    python = python or worker_python(settings)
    checks = [check_nvml(diagnostics, required=settings.gpu_source == "nvml")]
    simulated = None if settings.gpu_source == "nvml" else f"gpu_source is {settings.gpu_source}"
    checks.append(check_device_nodes(dev_dir, users, required_by=simulated))
    checks.extend(check_folders(settings, submit_group))
    checks.append(check_config(settings, config_path))
    ledger = check_ledger(settings)
    if ledger is not None:
        checks.append(ledger)
    checks.append(check_worker_command(settings, users))
    checks.append(check_extract_versions(python, pins))
    need_cuda = not settings.worker_device.startswith("cpu")
    checks.append(check_torch_cuda(python, need_cuda=need_cuda, timeout_s=torch_timeout_s))
    return checks


def _nvml_diagnostics() -> Diagnostics:
    try:
        from gpuspool.gpus import nvml_diagnostics
    except ImportError as exc:
        return _Failed(f"cannot load the NVML probe: {exc}")
    probe: Callable[[], Diagnostics] = nvml_diagnostics
    return probe()


@dataclass(frozen=True)
class _Failed:
    error: str
    ok: bool = False
    driver_version: str | None = None
    nvml_version: str | None = None
    device_count: int = 0
    version_mismatch: bool = False


def render(checks: Sequence[Check], console: Console) -> None:
    """Print each check: a mark, its name, what was seen, and the fix when it failed."""
    for check in checks:
        mark = "[green]✓[/green]" if check.ok else "[red]✗[/red]"
        console.print(f"{mark} [bold]{escape(check.name)}[/bold]: {escape(check.detail)}")
        if not check.ok and check.fix:
            console.print(f"    [yellow]fix:[/yellow] {escape(check.fix)}")
    failed = sum(not c.ok for c in checks)
    if failed:
        console.print(f"[red]{failed} problem(s) found.[/red]")
    else:
        console.print("[green]All checks passed.[/green]")


def main(settings: Settings, *, console: Console | None = None, **options: Any) -> int:
    """Run every check and print the findings; 0 if all passed, 1 otherwise.

    ``options`` go to :func:`run_checks` (``diagnostics=``, ``config_path=``, ...).
    """
    checks = run_checks(settings, **options)
    render(checks, console or Console())
    return 0 if all(c.ok for c in checks) else 1
