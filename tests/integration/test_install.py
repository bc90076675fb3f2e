"""deploy/install.sh into a temporary root: accounts, folders, modes, files; re-runs change nothing.

Needs root (it chowns to the accounts it creates). Most tests skip the venv step (--no-venv): it
would download torch. The venv tests at the end install offline with ``--no-deps`` from a
wheelhouse holding only the build backend, which they download from the package index.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "deploy" / "install.sh"

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="install.sh needs root (chown, user database)"),
]

#: The documented layout (docs/deploy.md): path -> (mode, owner, group).
LAYOUT = {
    "var/spool/gpuspool": (0o710, "root", "gpuspool-submit"),
    "var/spool/gpuspool/incoming": (0o1730, "root", "gpuspool-submit"),
    "var/spool/gpuspool/tmp": (0o1730, "root", "gpuspool-submit"),
    "var/spool/gpuspool/accepted": (0o700, "root", "root"),
    "var/spool/gpuspool/rejected": (0o711, "root", "root"),
    "var/lib/gpuspool": (0o711, "root", "root"),
    "var/lib/gpuspool/logs": (0o711, "root", "root"),
    "var/tmp/gpuspool": (0o711, "root", "root"),
}

CONFIG = 'poll_interval_s = 5.0\nlog_level = "info"\n'


def _install(root: Path, config: Path, *extra: str) -> str:
    done = subprocess.run(
        ["bash", str(INSTALL), "--root", str(root), "--prefix", "/opt/gs", "--no-venv",
         "--config", str(config), *extra],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def _db(root: Path, name: str) -> dict[str, list[str]]:
    """name -> fields of root/etc/passwd or root/etc/group."""
    lines = (root / "etc" / name).read_text().splitlines()
    return {f[0]: f for f in (line.split(":") for line in lines if line)}


def _ids(root: Path) -> tuple[dict[str, int], dict[str, int]]:
    users = {n: int(f[2]) for n, f in _db(root, "passwd").items()} | {"root": 0}
    groups = {n: int(f[2]) for n, f in _db(root, "group").items()} | {"root": 0}
    return users, groups


def _listing(root: Path) -> list[tuple[object, ...]]:
    """Every path with its type, mode, owner, group, mtime and content hash or link target."""
    rows: list[tuple[object, ...]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                content = ""
            mtime = 0 if name == ".pwd.lock" else st.st_mtime_ns  # a lock file, touched by design
            rows.append((str(path.relative_to(root)), stat.filemode(st.st_mode),
                         st.st_uid, st.st_gid, mtime, content))  # fmt: skip
    return sorted(rows)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A default config file to install."""
    path = tmp_path / "default.toml"
    path.write_text(CONFIG)
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An empty temporary root."""
    path = tmp_path / "root"
    path.mkdir()
    return path


@pytest.mark.parametrize("tools", ["systemd", "shadow"])
def test_install_creates_accounts_folders_and_files(root: Path, config: Path, tools: str) -> None:
    """Users, groups, folder modes/owners, config, unit and enablement are as documented."""
    if tools == "systemd" and not shutil.which("systemd-sysusers"):
        pytest.skip("systemd-sysusers not installed (apt-get install systemd)")
    _install(root, config, *(["--no-systemd-tools"] if tools == "shadow" else []))

    passwd = _db(root, "passwd")
    assert passwd["gpuspool"][6] == "/usr/sbin/nologin"
    users, groups = _ids(root)
    assert "gpuspool-submit" in groups and "gpuspool" in groups
    assert users["gpuspool"] < 1000  # a system account

    for rel, (mode, owner, group) in LAYOUT.items():
        st = (root / rel).stat()
        assert stat.S_ISDIR(st.st_mode), rel
        assert stat.S_IMODE(st.st_mode) == mode, (rel, oct(st.st_mode))
        assert (st.st_uid, st.st_gid) == (users[owner], groups[group]), rel

    installed_config = root / "etc/gpuspool/gpuspool.toml"
    assert installed_config.read_text() == CONFIG
    assert stat.S_IMODE(installed_config.stat().st_mode) == 0o644

    unit = (root / "etc/systemd/system/gpuspool.service").read_text()
    assert "ExecStart=/opt/gs/venv/bin/gpuspool --config /etc/gpuspool/gpuspool.toml daemon" in (
        unit
    )
    assert "/opt/gpuspool/" not in unit
    wants = root / "etc/systemd/system/multi-user.target.wants/gpuspool.service"
    assert os.readlink(wants) == "/etc/systemd/system/gpuspool.service"
    assert (root / "usr/lib/sysusers.d/gpuspool.conf").read_bytes() == (
        REPO / "deploy/gpuspool.sysusers.conf"
    ).read_bytes()
    assert (root / "usr/lib/tmpfiles.d/gpuspool.conf").read_bytes() == (
        REPO / "deploy/gpuspool.tmpfiles.conf"
    ).read_bytes()


@pytest.mark.parametrize("extra", [[], ["--no-systemd-tools"], ["--service-user"]])
def test_second_run_changes_nothing(root: Path, config: Path, extra: list[str]) -> None:
    """A second run leaves every path, mode, owner, mtime and content as it was."""
    _install(root, config, *extra)
    before = _listing(root)
    output = _install(root, config, *extra)
    assert _listing(root) == before
    assert "wrote" not in output and "enabled" not in output


def test_edited_config_is_never_overwritten(root: Path, config: Path) -> None:
    """An edited config survives a re-run; the new default goes beside it as .new."""
    _install(root, config)
    installed = root / "etc/gpuspool/gpuspool.toml"
    installed.write_text('log_level = "debug"\n')
    config.write_text(CONFIG + "stable_polls = 4\n")
    _install(root, config)
    assert installed.read_text() == 'log_level = "debug"\n'
    assert (root / "etc/gpuspool/gpuspool.toml.new").read_text() == config.read_text()
    before = _listing(root)
    _install(root, config)
    assert _listing(root) == before


def test_folders_are_repaired(root: Path, config: Path) -> None:
    """A re-run restores a drop folder whose mode was loosened and a private one made public."""
    _install(root, config)
    (root / "var/spool/gpuspool/incoming").chmod(0o777)
    (root / "var/lib/gpuspool").chmod(0o755)
    _install(root, config)
    assert stat.S_IMODE((root / "var/spool/gpuspool/incoming").stat().st_mode) == 0o1730
    assert stat.S_IMODE((root / "var/lib/gpuspool").stat().st_mode) == 0o711


def test_service_user_mode_and_back(root: Path, config: Path) -> None:
    """--service-user hands the folders to gpuspool and adds a drop-in; without it, undone."""
    _install(root, config, "--service-user")
    users, groups = _ids(root)
    accepted = (root / "var/spool/gpuspool/accepted").stat()
    assert (accepted.st_uid, accepted.st_gid) == (users["gpuspool"], groups["gpuspool"])
    incoming = (root / "var/spool/gpuspool/incoming").stat()
    assert (incoming.st_uid, incoming.st_gid) == (users["gpuspool"], groups["gpuspool-submit"])
    dropin = root / "etc/systemd/system/gpuspool.service.d/service-user.conf"
    assert "User=gpuspool" in dropin.read_text()

    _install(root, config)
    assert not dropin.exists()
    assert not (root / "etc/tmpfiles.d/gpuspool.conf").exists()
    assert (root / "var/spool/gpuspool/accepted").stat().st_uid == 0


def test_missing_config_is_an_error(root: Path, tmp_path: Path) -> None:
    """Without a config to install, the script stops before touching the root."""
    done = subprocess.run(
        ["bash", str(INSTALL), "--root", str(root), "--no-venv",
         "--config", str(tmp_path / "absent.toml")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert "no config to install" in done.stderr
    assert list(root.iterdir()) == []


@pytest.mark.skipif(not (REPO / "config/gpuspool.toml").exists(), reason="no config/gpuspool.toml")
def test_default_config_is_the_repository_one(root: Path) -> None:
    """Without --config, config/gpuspool.toml is installed, and it loads."""
    from gpuspool.config import load_settings

    done = subprocess.run(
        ["bash", str(INSTALL), "--root", str(root), "--no-venv"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    installed = root / "etc/gpuspool/gpuspool.toml"
    assert installed.read_bytes() == (REPO / "config/gpuspool.toml").read_bytes()
    assert load_settings(installed).spool_dir == Path("/var/spool/gpuspool")


# -- the venv step ------------------------------------------------------------------------------
# Offline, with --no-deps: the wheelhouse holds only the build backend (hatchling), so the test
# builds and installs gpuspool itself for real without downloading torch.


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """hatchling and its dependencies as wheels, fetched once from the package index."""
    path = tmp_path_factory.mktemp("wheels")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
         "--dest", str(path), "hatchling>=1.25"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        message = f"cannot download hatchling for the offline install: {done.stderr[-500:]}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A copy of the checkout that the test may edit (install.sh installs the tree it is in)."""
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / part, src / part)
    for part in ("src", "deploy", "config", "systemd", "docs"):
        shutil.copytree(REPO / part, src / part, ignore=ignore)
    return src


def _install_venv(
    source: Path, root: Path, config: Path, wheels: Path, *extra: str, pip: str = ""
) -> str:
    pip_args = f"--no-index --no-deps --find-links {wheels} {pip}".strip()
    done = subprocess.run(
        ["bash", str(source / "deploy/install.sh"), "--root", str(root), "--prefix", "/opt/gs",
         "--python", sys.executable, "--pip-args", pip_args,
         "--config", str(config), "--no-enable", *extra],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _installed_init(root: Path) -> Path:
    [init] = (root / "opt/gs/venv/lib").glob("python3*/site-packages/gpuspool/__init__.py")
    return init


def test_venv_step_runs_pip_only_when_something_changed(
    source: Path, root: Path, config: Path, wheelhouse: Path
) -> None:
    """First run installs; a re-run leaves the venv untouched; an edited source, or
    --reinstall, installs again."""
    first = _install_venv(source, root, config, wheelhouse)
    assert "installed gpuspool[extract]" in first
    version = subprocess.run(
        [str(root / "opt/gs/venv/bin/python"), "-I", "-c",
         "import importlib.metadata as m; print(m.version('gpuspool'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert version == "0.1.0"
    # The package metadata: the license text ships in the wheel, classifiers are set.
    [dist] = (root / "opt/gs/venv/lib").glob("python3*/site-packages/gpuspool-0.1.0.dist-info")
    licenses = [p for p in dist.rglob("LICENSE") if p.is_file()]
    assert licenses and licenses[0].read_bytes() == (REPO / "LICENSE").read_bytes()
    metadata = (dist / "METADATA").read_text()
    assert "License-Expression: Apache-2.0" in metadata or "License: Apache-2.0" in metadata
    assert "Classifier: Operating System :: POSIX :: Linux" in metadata
    init = _installed_init(root)
    mtime = init.stat().st_mtime_ns

    again = _install_venv(source, root, config, wheelhouse)
    assert "is up to date" in again and "installed gpuspool" not in again
    assert init.stat().st_mtime_ns == mtime  # pip did not run

    with open(source / "src/gpuspool/__init__.py", "a") as f:
        f.write("# changed\n")
    changed = _install_venv(source, root, config, wheelhouse)
    assert "installed gpuspool[extract]" in changed
    assert _installed_init(root).read_text().endswith("# changed\n")

    forced = _install_venv(source, root, config, wheelhouse, "--reinstall")
    assert "installed gpuspool[extract]" in forced


def test_venv_is_byte_compiled_even_when_pip_is_told_not_to(
    source: Path, root: Path, config: Path, wheelhouse: Path
) -> None:
    """Jobs run as their submitters, who cannot write ``__pycache__`` into the venv: after the
    install every module of the package has current bytecode, even with pip's --no-compile, so
    no job compiles it again."""
    _install_venv(source, root, config, wheelhouse, pip="--no-compile")
    package = _installed_init(root).parent
    sources = sorted(package.rglob("*.py"))
    assert len(sources) > 20
    for src in sources:
        cached = Path(importlib.util.cache_from_source(str(src)))
        header = cached.read_bytes()[:16]
        st = src.stat()
        assert header[:4] == importlib.util.MAGIC_NUMBER, src
        assert int.from_bytes(header[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF, src
        assert int.from_bytes(header[12:16], "little") == st.st_size & 0xFFFFFFFF, src


def test_offline_install_without_hatchling_fails_naming_it(
    source: Path, root: Path, config: Path, tmp_path: Path
) -> None:
    """What docs/deploy.md warns about: a wheelhouse without the build backend cannot build
    gpuspool, and pip says it is hatchling that is missing."""
    empty = tmp_path / "empty-wheels"
    empty.mkdir()
    done = subprocess.run(
        ["bash", str(source / "deploy/install.sh"), "--root", str(root), "--prefix", "/opt/gs",
         "--python", sys.executable, "--pip-args", f"--no-index --no-deps --find-links {empty}",
         "--config", str(config), "--no-enable"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert "No matching distribution found for hatchling" in done.stdout + done.stderr
    assert not (root / "opt/gs/venv/.gpuspool-install-stamp").exists()
