"""Jobs run as the submitter, never as root, and only touch paths the submitter could.

These tests need root: they create an unprivileged system user and start processes as it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpuspool.privileges import (
    CheckMethod,
    Identity,
    PrivilegeError,
    check_access,
    check_input_readable,
    check_job_paths,
    check_output_writable,
    current_identity,
    identity_env,
    identity_for_name,
    identity_for_uid,
    job_identity,
    popen_kwargs,
)
from tests.integration.conftest import TEST_USER, ensure_test_user

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates a user and runs as it"),
]

TEST_GROUP = "gpuspool-test-g"  # a supplementary group of TEST_USER


def _ensure_group(name: str) -> None:
    if subprocess.run(["getent", "group", name], capture_output=True).returncode != 0:
        subprocess.run(["groupadd", "--system", name], check=True)


@pytest.fixture(scope="session")
def user() -> Identity:
    """An unprivileged system user (created if missing) with one supplementary group."""
    _ensure_group(TEST_GROUP)
    ensure_test_user()
    subprocess.run(["usermod", "--append", "--groups", TEST_GROUP, TEST_USER], check=True)
    return identity_for_name(TEST_USER)


@pytest.fixture(scope="session")
def group_gid(user: Identity) -> int:
    """The gid of the test user's supplementary group."""
    import grp

    return grp.getgrnam(TEST_GROUP).gr_gid


@pytest.fixture
def shared(user: Identity) -> Iterator[Path]:
    """A root-owned 0755 folder under /tmp that the test user can enter (pytest's tmp is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="gpuspool-priv-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def _make(path: Path, mode: int, *, uid: int = 0, gid: int = 0, text: str = "x\n") -> Path:
    if text is not None and not path.exists():
        path.write_text(text)
    os.chown(path, uid, gid)
    path.chmod(mode)
    return path


def _mkdir(path: Path, mode: int, *, uid: int = 0, gid: int = 0) -> Path:
    path.mkdir()
    os.chown(path, uid, gid)
    path.chmod(mode)
    return path


# --- who runs the job ------------------------------------------------------------------------


def test_child_runs_as_the_identity_and_owns_its_files(user: Identity, shared: Path) -> None:
    """A child started with popen_kwargs has the user's uid, gid, groups and umask 022."""
    work = _mkdir(shared / "work", 0o755, uid=user.uid, gid=user.gid)
    done = subprocess.run(
        ["/bin/sh", "-c", "id -u; id -g; id -G; umask; echo data > made"],
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
        **popen_kwargs(user),
    )
    uid, gid, groups, umask = done.stdout.split("\n")[:4]
    assert int(uid) == user.uid
    assert int(gid) == user.gid
    assert {int(g) for g in groups.split()} == set(user.groups)
    assert int(umask, 8) == 0o022
    made = (work / "made").stat()
    assert (made.st_uid, made.st_gid) == (user.uid, user.gid)
    assert made.st_mode & 0o777 == 0o644


def test_child_cannot_regain_root(user: Identity) -> None:
    """The switch is complete: the child cannot setuid(0) back."""
    done = subprocess.run(
        ["/bin/sh", "-c", "exec su -c true root </dev/null 2>/dev/null; exit 7"],
        capture_output=True,
        timeout=30,
        check=False,
        **popen_kwargs(user),
    )
    assert done.returncode != 0
    assert os.geteuid() == 0  # and the daemon itself is unchanged


def test_popen_kwargs_keep_the_current_identity(user: Identity) -> None:
    """No user switch for the daemon's own identity; only the umask, or nothing."""
    me = current_identity()
    assert popen_kwargs(me) == {"umask": 0o022}
    assert popen_kwargs(me, umask=None) == {}
    assert popen_kwargs(user)["user"] == user.uid


def test_identity_env_names_the_user(user: Identity) -> None:
    """HOME, USER and LOGNAME describe the job's user, not root."""
    assert identity_env(user) == {"HOME": user.home, "USER": TEST_USER, "LOGNAME": TEST_USER}


def test_submitter_runs_as_themselves_under_a_root_daemon(user: Identity) -> None:
    """A job file owned by the test user runs as the test user."""
    assert job_identity(user.uid, daemon_euid=0, fallback_user=None) == user


def test_root_owned_job_is_rejected_without_fallback_user() -> None:
    """A root-owned job file never runs as root: rejected when no fallback_user is set."""
    with pytest.raises(PrivilegeError, match="never run as root"):
        job_identity(0, daemon_euid=0, fallback_user=None)


def test_root_owned_job_runs_as_fallback_user(user: Identity) -> None:
    """With fallback_user configured, a root-owned job runs as that user."""
    assert job_identity(0, daemon_euid=0, fallback_user=TEST_USER) == user


def test_fallback_user_must_exist_and_not_be_root() -> None:
    """fallback_user = root, or a user that does not exist, still rejects the job."""
    with pytest.raises(PrivilegeError, match="never run as root"):
        job_identity(0, daemon_euid=0, fallback_user="root")
    with pytest.raises(PrivilegeError, match="no user called"):
        job_identity(0, daemon_euid=0, fallback_user="no-such-user-gpuspool")


def test_unprivileged_daemon_runs_every_job_as_itself(user: Identity) -> None:
    """A daemon that is not root cannot switch: the job runs as the daemon's user."""
    assert job_identity(0, daemon_euid=user.uid, fallback_user=None) == user
    assert job_identity(12345, daemon_euid=user.uid, fallback_user=None) == user


def test_uid_without_account_is_rejected() -> None:
    """A job file owned by a uid with no passwd entry cannot run."""
    unused = next(u for u in range(60000, 65000) if not _has_uid(u))
    with pytest.raises(PrivilegeError, match="no account"):
        job_identity(unused, daemon_euid=0, fallback_user=None)


def _has_uid(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


# --- path checks, as the kernel answers them --------------------------------------------------


def test_output_folder_the_user_cannot_write_is_refused(user: Identity, shared: Path) -> None:
    """An output in a root-owned 0755 folder is refused, naming the folder."""
    folder = _mkdir(shared / "out", 0o755)
    reason = check_output_writable(user, folder / "codes.jsonl")
    assert reason == f"{user} may not write to the output folder {folder}"


def test_output_folder_the_user_owns_is_accepted(user: Identity, shared: Path) -> None:
    """An output in a folder the user owns is accepted."""
    folder = _mkdir(shared / "mine", 0o700, uid=user.uid)
    assert check_output_writable(user, folder / "codes.jsonl") is None


def test_existing_output_is_refused(user: Identity, shared: Path) -> None:
    """The output must not exist yet, not even as a dangling symbolic link."""
    folder = _mkdir(shared / "mine", 0o755, uid=user.uid)
    _make(folder / "old.jsonl", 0o644, uid=user.uid)
    (folder / "link.jsonl").symlink_to(folder / "nowhere")
    assert check_output_writable(user, folder / "old.jsonl") == (
        f"output {folder / 'old.jsonl'} already exists"
    )
    assert check_output_writable(user, folder / "link.jsonl") == (
        f"output {folder / 'link.jsonl'} already exists (a symbolic link)"
    )


def test_unreadable_input_is_refused(user: Identity, shared: Path) -> None:
    """A root-owned 0600 input is refused; the same file at 0644 is accepted."""
    data = _make(shared / "in.jsonl", 0o600)
    assert check_input_readable(user, data) == f"{user} may not read input {data}"
    data.chmod(0o644)
    assert check_input_readable(user, data) is None


def test_input_behind_a_private_folder_is_refused(user: Identity, shared: Path) -> None:
    """A readable file inside a folder the user may not enter is refused at the folder."""
    private = _mkdir(shared / "private", 0o700)
    data = _make(private / "in.jsonl", 0o644)
    assert check_input_readable(user, data) == (
        f"{user} may not enter {private} (no search permission)"
    )


def test_symlink_into_a_private_folder_is_refused(user: Identity, shared: Path) -> None:
    """A symlink the user can see, pointing into a folder they cannot enter, does not help."""
    private = _mkdir(shared / "private", 0o700)
    _make(private / "secret.jsonl", 0o644)
    (shared / "alias.jsonl").symlink_to(private / "secret.jsonl")
    alias = shared / "alias.jsonl"
    assert check_input_readable(user, alias) == (
        f"input {alias} does not exist or {user} cannot reach it"
    )
    assert check_input_readable(identity_for_uid(0), alias) is None


def test_missing_input_and_non_files_are_refused(user: Identity, shared: Path) -> None:
    """A missing input or a directory as input gets its own reason."""
    assert check_input_readable(user, shared / "nope.jsonl") == (
        f"input {shared / 'nope.jsonl'} does not exist or {user} cannot reach it"
    )
    assert check_input_readable(user, shared) == f"input {shared} is not a regular file"


def test_relative_paths_are_refused(user: Identity) -> None:
    """Only absolute paths without '..' are checked."""
    assert check_input_readable(user, Path("in.jsonl")) == "in.jsonl is not an absolute path"
    assert check_output_writable(user, Path("/tmp/../etc/x")) == "/tmp/../etc/x contains '..'"


def test_check_job_paths_checks_the_fallback_user_too(user: Identity, shared: Path) -> None:
    """A root-submitted job running as the fallback user needs that user's rights as well."""
    root = identity_for_uid(0)
    data = _make(shared / "in.jsonl", 0o600)
    out = _mkdir(shared / "out", 0o777)
    assert check_job_paths(root, root, data, out / "x.jsonl") is None
    assert check_job_paths(root, user, data, out / "x.jsonl") == (
        f"{user} may not read input {data}"
    )


def test_check_access_reports_missing_rights(user: Identity, shared: Path) -> None:
    """check_access(r/w) names the missing right (used for /dev/nvidia* by the doctor)."""
    node = _make(shared / "node", 0o644)
    assert check_access(user, node, "r") is None
    assert check_access(user, node, "rw") == f"{user} may not write {node}"


# --- the kernel and the mode-bit evaluation agree ---------------------------------------------


def _scenarios(shared: Path, user: Identity, gid: int) -> list[tuple[str, Path]]:
    """(kind, path) pairs covering owner/group/other bits, symlinks, '..' in link targets."""
    a = _mkdir(shared / "a", 0o755)
    _make(a / "world.jsonl", 0o644)
    _make(a / "rootonly.jsonl", 0o600)
    _make(a / "group.jsonl", 0o640, gid=gid)
    # Group bits deny although "other" bits allow: the group class decides for members.
    _make(a / "groupdenied.jsonl", 0o604, gid=gid)
    _make(a / "mine.jsonl", 0o400, uid=user.uid)
    # Owner bits deny although "other" bits allow.
    _make(a / "ownerdenied.jsonl", 0o004, uid=user.uid)
    g = _mkdir(shared / "g", 0o770, gid=gid)
    _make(g / "in.jsonl", 0o644)
    p = _mkdir(shared / "p", 0o711)  # search but no listing
    _make(p / "in.jsonl", 0o644)
    x = _mkdir(shared / "x", 0o700)
    _make(x / "in.jsonl", 0o644)
    (a / "up.jsonl").symlink_to("../x/in.jsonl")
    (a / "ok.jsonl").symlink_to("../g/in.jsonl")
    (a / "loop").symlink_to("loop")
    w = _mkdir(shared / "w", 0o1777)
    _mkdir(shared / "gw", 0o730, gid=gid)
    (shared / "wl").symlink_to("w")
    names_in = [
        "a/world.jsonl", "a/rootonly.jsonl", "a/group.jsonl", "a/groupdenied.jsonl",
        "a/mine.jsonl", "a/ownerdenied.jsonl", "g/in.jsonl", "p/in.jsonl", "x/in.jsonl",
        "a/up.jsonl", "a/ok.jsonl", "a/loop", "a", "missing/in.jsonl",
    ]  # fmt: skip
    names_out = ["w/o.jsonl", "gw/o.jsonl", "a/o.jsonl", "x/o.jsonl", "wl/o.jsonl",
                 "a/world.jsonl", "p/o.jsonl", "a/loop"]  # fmt: skip
    assert w.exists()
    return [("in", shared / n) for n in names_in] + [("out", shared / n) for n in names_out]


@pytest.mark.parametrize("method", ["modebits", "self"])
def test_evaluation_matches_the_kernel(
    user: Identity, group_gid: int, shared: Path, method: CheckMethod
) -> None:
    """Mode-bit evaluation gives the kernel's answer (a process running as the user)."""
    scenarios = _scenarios(shared, user, group_gid)
    who = user if method == "modebits" else current_identity()
    kernel_who = user if method == "modebits" else who
    answers = []
    for kind, path in scenarios:
        check = check_input_readable if kind == "in" else check_output_writable
        kernel = check(kernel_who, path, method="process" if method == "modebits" else "self")
        answers.append((kind, path.name, kernel))
        assert check(who, path, method=method) == kernel, (kind, path)
    # The matrix really exercises both outcomes for the unprivileged user.
    if method == "modebits":
        assert any(a[2] is None for a in answers)
        assert sum(a[2] is not None for a in answers) >= 10


def _posix_acl(entries: list[tuple[int, int, int]]) -> bytes:
    """The system.posix_acl_access xattr value: version 2, then (tag, perm, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_acl_is_seen_by_the_kernel_and_refused_by_mode_bits(user: Identity, shared: Path) -> None:
    """A file readable only through a named-user ACL: the kernel says yes, mode bits refuse."""
    data = _make(shared / "acl.jsonl", 0o600)
    user_obj, named_user, group_obj, mask, other = 0x01, 0x02, 0x04, 0x10, 0x20
    undefined = 0xFFFFFFFF
    acl = _posix_acl(
        [
            (user_obj, 6, undefined),
            (named_user, 4, user.uid),
            (group_obj, 0, undefined),
            (mask, 4, undefined),
            (other, 0, undefined),
        ]
    )
    try:
        os.setxattr(data, "system.posix_acl_access", acl)
    except OSError as exc:
        pytest.skip(f"this filesystem has no POSIX ACLs: {exc}")
    assert check_input_readable(user, data, method="process") is None
    reason = check_input_readable(user, data, method="modebits")
    assert reason is not None and "POSIX ACL" in reason
