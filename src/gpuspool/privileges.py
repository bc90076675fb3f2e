"""Who a job runs as, and whether that user may touch the paths the job names.

The model is the one of ``at`` and ``batch``: when the daemon runs as root, a job runs as the
user who owns the job file (the submitter), so whatever it reads or writes is checked by the
kernel against that user, and its output belongs to that user. A job never runs as root: a job
file owned by root runs as ``fallback_user`` when one is configured and is rejected otherwise.
When the daemon is not root it cannot switch users, so every job runs as the daemon's user (see
``docs/deploy.md`` for what that means for permissions).

Because a job names its input and output paths, the daemon must not become a confused deputy.
At intake, the scanner (``scan.py``) answers that by running as the job's user; the checks
below ask the same question for other callers (``doctor``, ``demo``) and, with ``modebits``, for
the scanner of a daemon that is not root and so cannot become the submitter. How the question
is answered (``method``):

``self``
    The identity is the daemon's own: ``os.stat``/``os.access`` in this process.
``process``
    The daemon is root and the identity is someone else: a short-lived ``/bin/sh`` started with
    that user's uid, gid and groups runs ``test -e/-d/-r/-w/-x`` on each path component. The
    kernel answers, so ACLs, LSMs, NFS root squashing and symbolic links are all seen exactly as
    that user sees them (only an executable ``/bin/sh`` is needed, no interpreter or package).
``modebits``
    The daemon is neither root nor that user (it cannot switch): the path is resolved component
    by component (symbolic links followed, at most 40) and the owner/group/other mode bits are
    evaluated for that user's uid and groups. A component carrying a POSIX ACL cannot be judged
    from its bits unless the user owns it; such paths are refused, which errs on the safe side.

The checks are early, human-readable refusals; they are not the security boundary when jobs run
as the submitter (the kernel is). They are the boundary when the daemon is not root: then a job
runs with the daemon's rights, so only trusted submitters should be in the submit group.

Owns: users, groups and permission checks. Imports ``subprocess`` only for the ``process``
check (the runner owns job processes).
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from gpuspool.fairshare import clamp_priority

if TYPE_CHECKING:
    from gpuspool.config import Settings
    from gpuspool.models import JobSpec

CheckMethod = Literal["auto", "self", "process", "modebits"]

#: umask a job starts with: new files readable by others, like a login shell's default.
JOB_UMASK = 0o022

#: Seconds a permission-check child may take (a hung NFS mount must not hang intake).
CHECK_TIMEOUT_S = 10.0

_PERMISSION_BITS = {"r": 4, "w": 2, "x": 1}  # of one rwx triple
_MAX_SYMLINKS = 40  # the kernel's limit for one path walk (ELOOP after 40)
_CHECK_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# Each argument is "OP:PATH"; prints one 1 (true) or 0 (false) per argument, in order.
_PROBE_SCRIPT = (
    'for a do op=${a%%:*}; p=${a#*:}; if test "-$op" "$p"; then printf 1; else printf 0; fi; done'
)


class PrivilegeError(Exception):
    """A job cannot run as anyone acceptable; ``reason`` says why in words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Identity:
    """A user a process can run as: uid, primary gid, all group ids, name and home."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    name: str
    home: str

    def __str__(self) -> str:
        return f"{self.name} (uid {self.uid})"


def _from_passwd(pw: pwd.struct_passwd) -> Identity:
    groups = os.getgrouplist(pw.pw_name, pw.pw_gid)
    ordered = tuple(dict.fromkeys([pw.pw_gid, *groups]))  # primary group first, no duplicates
    return Identity(pw.pw_uid, pw.pw_gid, ordered, pw.pw_name, pw.pw_dir)


def identity_for_uid(uid: int) -> Identity:
    """The account of ``uid`` (passwd + group database); PrivilegeError if it has none."""
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        raise PrivilegeError(f"uid {uid} has no account (no passwd entry)") from None
    return _from_passwd(pw)


def identity_for_name(name: str) -> Identity:
    """The account called ``name``; PrivilegeError if there is none."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise PrivilegeError(f"there is no user called {name!r}") from None
    return _from_passwd(pw)


def user_name_of(uid: int) -> str | None:
    """The login name of ``uid``, or None when it has no passwd entry."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def group_names_of(uid: int) -> list[str]:
    """The names of all groups of ``uid`` (primary and supplementary); [] without an account."""
    try:
        identity = identity_for_uid(uid)
    except PrivilegeError:
        return []
    names = []
    for gid in identity.groups:
        try:
            names.append(grp.getgrgid(gid).gr_name)
        except KeyError:
            continue
    return names


def job_priority(spec: JobSpec, uid: int, settings: Settings) -> tuple[JobSpec, str | None]:
    """``spec`` with the priority its submitter may set, and a note when it was lowered.

    Positive priorities only for ``priority_users``, members of ``priority_groups`` and the
    daemon's own user (root on a shared server; the only submitter on a single-user machine,
    where there is no one to be fair to). Intake calls this just before recording the job
    (``ledger.add(spec=..., note=...)``); the note lands in the "submitted" transition, which
    ``show`` lists.
    """
    if uid == os.geteuid():
        return spec, None
    priority, note = clamp_priority(
        spec.priority,
        uid,
        priority_users=settings.priority_users,
        priority_groups=settings.priority_groups,
        user_name=user_name_of,
        user_groups=group_names_of,
    )
    if note is None:
        return spec, None
    return spec.model_copy(update={"priority": priority}), note


def current_identity() -> Identity:
    """This process's effective uid, gid and groups (what a child inherits by default)."""
    uid, gid = os.geteuid(), os.getegid()
    try:
        pw = pwd.getpwuid(uid)
        name, home = pw.pw_name, pw.pw_dir
    except KeyError:
        name, home = str(uid), "/"
    groups = tuple(dict.fromkeys([gid, *os.getgroups()]))
    return Identity(uid, gid, groups, name, home)


def job_identity(submitter_uid: int, *, daemon_euid: int, fallback_user: str | None) -> Identity:
    """Who runs a job whose file ``submitter_uid`` owns; PrivilegeError if nobody may.

    Daemon not root: the daemon's own user (it cannot switch). Daemon root: the submitter,
    or ``fallback_user`` for a root-owned job file; never root.
    """
    if daemon_euid != 0:
        return identity_for_uid(daemon_euid)
    if submitter_uid != 0:
        return identity_for_uid(submitter_uid)
    if fallback_user is None:
        raise PrivilegeError(
            "the job file is owned by root and jobs never run as root; submit it as an ordinary "
            "user or set fallback_user in the config"
        )
    identity = identity_for_name(fallback_user)
    if identity.uid == 0:
        raise PrivilegeError(f"fallback_user {fallback_user!r} is root; jobs never run as root")
    return identity


def _is_current(identity: Identity) -> bool:
    return identity.uid == os.geteuid() and identity.gid == os.getegid()


def popen_kwargs(identity: Identity, *, umask: int | None = JOB_UMASK) -> dict[str, Any]:
    """Keyword arguments for ``subprocess.Popen`` that start a child as ``identity``.

    Empty of ``user``/``group``/``extra_groups`` when the child would already run as
    ``identity``; ``umask`` is always included unless None, because the daemon's own umask (the
    unit sets 0077) would make a job's output unreadable to its submitter. PrivilegeError when a
    switch is needed and this process is not root.
    """
    kwargs: dict[str, Any] = {}
    same_groups = set(identity.groups) == {os.getegid(), *os.getgroups()}
    if not (_is_current(identity) and same_groups):
        if os.geteuid() != 0:
            raise PrivilegeError(f"cannot run a job as {identity}: the daemon is not root")
        kwargs.update(user=identity.uid, group=identity.gid, extra_groups=list(identity.groups))
    if umask is not None:
        kwargs["umask"] = umask
    return kwargs


#: Switches to a user after exec (util-linux); see :func:`switch_after_exec`.
SETPRIV = "/usr/bin/setpriv"


def switch_after_exec(
    identity: Identity, *, umask: int | None = JOB_UMASK
) -> tuple[list[str], dict[str, Any]]:
    """An argv prefix and ``Popen`` keyword arguments that start a child as ``identity``.

    The switch is made by ``setpriv`` after the exec, not by ``Popen``: ``Popen`` switches
    between fork and exec and then waits for the exec, so a user who SIGSTOPs their new
    process in between (it is already theirs) would hold the caller forever. ``setpriv``
    starts as root, which they cannot signal, and the caller is free once it runs.
    """
    kwargs = popen_kwargs(identity, umask=umask)
    if "user" not in kwargs:
        return [], kwargs
    for key in ("user", "group", "extra_groups"):
        del kwargs[key]
    groups = ",".join(str(g) for g in identity.groups)
    prefix = [SETPRIV, f"--reuid={identity.uid}", f"--regid={identity.gid}", f"--groups={groups}"]
    return [*prefix, "--"], kwargs


def identity_env(identity: Identity) -> dict[str, str]:
    """``HOME``, ``USER`` and ``LOGNAME`` for a job's environment (caches: its scratch folder)."""
    return {"HOME": identity.home, "USER": identity.name, "LOGNAME": identity.name}


# --- permission checks ---------------------------------------------------------------------

# A probe is (op, path, expected, reason): ``test -op path`` must equal ``expected``, otherwise
# ``reason`` is the answer. Probes run in order; the first mismatch wins, so a missing parent is
# reported before the missing file below it.
_Probe = tuple[str, str, bool, str]


def _directory_probes(identity: Identity, directory: Path) -> list[_Probe]:
    probes: list[_Probe] = []
    for d in [*reversed(directory.parents), directory]:
        p = str(d)
        probes.append(("e", p, True, f"{p} does not exist or {identity} cannot reach it"))
        probes.append(("d", p, True, f"{p} is not a directory"))
        probes.append(("x", p, True, f"{identity} may not enter {p} (no search permission)"))
    return probes


def _absolute(path: Path) -> str | None:
    if not path.is_absolute():
        return f"{path} is not an absolute path"
    if ".." in path.parts:
        return f"{path} contains '..'"
    return None


def check_input_readable(
    identity: Identity, path: Path, *, method: CheckMethod = "auto"
) -> str | None:
    """None if ``identity`` can read the regular file ``path``; else the reason, in words."""
    path = Path(path)
    if (bad := _absolute(path)) is not None:
        return bad
    p = str(path)
    probes = _directory_probes(identity, path.parent)
    probes += [
        ("e", p, True, f"input {p} does not exist or {identity} cannot reach it"),
        ("f", p, True, f"input {p} is not a regular file"),
        ("r", p, True, f"{identity} may not read input {p}"),
    ]
    return _run_probes(identity, probes, method)


def check_output_writable(
    identity: Identity, output_path: Path, *, method: CheckMethod = "auto"
) -> str | None:
    """None if ``identity`` can create ``output_path`` (which must not exist); else the reason."""
    output_path = Path(output_path)
    if (bad := _absolute(output_path)) is not None:
        return bad
    p, parent = str(output_path), output_path.parent
    probes = _directory_probes(identity, parent)
    probes += [
        ("w", str(parent), True, f"{identity} may not write to the output folder {parent}"),
        ("L", p, False, f"output {p} already exists (a symbolic link)"),
        ("e", p, False, f"output {p} already exists"),
    ]
    return _run_probes(identity, probes, method)


def check_access(
    identity: Identity, path: Path, want: str, *, method: CheckMethod = "auto"
) -> str | None:
    """None if ``identity`` reaches ``path`` and has each of ``want`` (letters of "rwx")."""
    path = Path(path)
    if (bad := _absolute(path)) is not None:
        return bad
    p = str(path)
    probes = _directory_probes(identity, path.parent) if path.parent != path else []
    probes.append(("e", p, True, f"{p} does not exist or {identity} cannot reach it"))
    names = {"r": "read", "w": "write", "x": "execute"}
    for letter in want:
        probes.append((letter, p, True, f"{identity} may not {names[letter]} {p}"))
    return _run_probes(identity, probes, method)


def check_job_paths(
    submitter: Identity, runs_as: Identity, input_path: Path, output_path: Path
) -> str | None:
    """Both paths checked as the submitter and, if the job runs as someone else, as that user."""
    for who in dict.fromkeys([submitter, runs_as]):
        reason = check_input_readable(who, input_path) or check_output_writable(who, output_path)
        if reason is not None:
            return reason
    return None


def regular_files_as(identity: Identity, paths: list[Path]) -> list[bool] | None:
    """For each path, whether ``identity`` sees a regular file there (``test -f``, links
    followed as that user follows them); None if that cannot be answered. The daemon asks
    this about a job's output instead of looking itself, as root, where the user pointed."""
    chosen = _choose(identity, "auto")
    probes = [("f", str(p)) for p in paths]
    try:
        if chosen == "process":
            return _probe_in_child(identity, probes)
        evaluate = _probe_self if chosen == "self" else _ModeBits(identity).probe
        return [evaluate(op, path) for op, path in probes]
    except _Undecidable:
        return None


def _choose(identity: Identity, method: CheckMethod) -> CheckMethod:
    if method != "auto":
        return method
    if _is_current(identity):
        return "self"
    return "process" if os.geteuid() == 0 else "modebits"


def _run_probes(identity: Identity, probes: list[_Probe], method: CheckMethod) -> str | None:
    chosen = _choose(identity, method)
    try:
        if chosen == "process":
            answers = _probe_in_child(identity, [(op, path) for op, path, _, _ in probes])
        else:
            evaluate = _probe_self if chosen == "self" else _ModeBits(identity).probe
            answers = []
            for op, path, expected, _ in probes:
                answers.append(evaluate(op, path))
                if answers[-1] != expected:
                    break
    except _Undecidable as exc:
        return exc.reason
    for (_, _, expected, reason), answer in zip(probes, answers, strict=False):
        if answer != expected:
            return reason
    return None


class _Undecidable(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _probe_in_child(identity: Identity, probes: list[tuple[str, str]]) -> list[bool]:
    """Run ``test`` for each probe in a ``/bin/sh`` that runs as ``identity``."""
    argv = ["/bin/sh", "-c", _PROBE_SCRIPT, "sh", *(f"{op}:{path}" for op, path in probes)]
    try:
        prefix, kwargs = switch_after_exec(identity, umask=0o077)
        child = subprocess.Popen(
            [*prefix, *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={"PATH": _CHECK_PATH},
            cwd="/",
            **kwargs,
        )
    except (OSError, subprocess.SubprocessError, PrivilegeError) as exc:
        raise _Undecidable(f"could not check paths as {identity}: {exc}") from exc
    raw = _output_unless_stopped(child)
    if raw is None:
        raise _Undecidable(f"could not check paths as {identity}: the check process was stopped"
                           " or took too long")  # fmt: skip
    out = raw.decode("ascii", "replace")
    if child.returncode != 0 or len(out) != len(probes) or set(out) - {"0", "1"}:
        raise _Undecidable(f"could not check paths as {identity}: the check process failed")
    return [c == "1" for c in out]


def _output_unless_stopped(child: subprocess.Popen[bytes]) -> bytes | None:
    """The check process's stdout once it exits; None (it is killed) when it is stopped or
    past :data:`CHECK_TIMEOUT_S`. It runs as the user, who may SIGSTOP it: the daemon's tick
    waits on it, so a stopped one is given up at once, not after the timeout."""
    deadline = time.monotonic() + CHECK_TIMEOUT_S
    while True:
        try:
            out, _ = child.communicate(timeout=0.02)
            return out
        except subprocess.TimeoutExpired:
            if time.monotonic() < deadline and not _stopped(child.pid):
                continue
        child.kill()
        child.communicate()
        return None


def _stopped(pid: int) -> bool:
    """Whether the process ``pid`` is stopped (by a signal or a tracer)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in (b"T", b"t")


def _probe_self(op: str, path: str) -> bool:
    """``test -op path`` answered by this process's own rights."""
    if op == "L":
        return os.path.islink(path)
    try:
        st = os.stat(path)
    except OSError:
        return False
    if op == "e":
        return True
    if op == "d":
        return stat.S_ISDIR(st.st_mode)
    if op == "f":
        return stat.S_ISREG(st.st_mode)
    mode = {"r": os.R_OK, "w": os.W_OK, "x": os.X_OK}[op]
    return os.access(path, mode, effective_ids=True)


class _ModeBits:
    """``test -op path`` answered from mode bits for a user this process cannot become."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity

    def probe(self, op: str, path: str) -> bool:
        found = self._lookup(path, follow=op != "L")
        if found is None:
            return False
        real, st = found
        if op == "L":
            return stat.S_ISLNK(st.st_mode)
        if op == "e":
            return True
        if op == "d":
            return stat.S_ISDIR(st.st_mode)
        if op == "f":
            return stat.S_ISREG(st.st_mode)
        if op == "w" and os.statvfs(real).f_flag & os.ST_RDONLY:
            return False
        return self._permits(real, st, _PERMISSION_BITS[op])

    def _permits(self, path: str, st: os.stat_result, bit: int) -> bool:
        ident = self.identity
        if ident.uid == 0:
            return bit != 1 or stat.S_ISDIR(st.st_mode) or bool(st.st_mode & 0o111)
        if st.st_uid == ident.uid:
            return bool((st.st_mode >> 6) & bit)  # the owner's bits are exact even with an ACL
        if _has_acl(path):
            raise _Undecidable(
                f"{path} has a POSIX ACL; the daemon (not root) cannot evaluate it for {ident}"
            )
        if st.st_gid in ident.groups:
            return bool((st.st_mode >> 3) & bit)
        return bool(st.st_mode & bit)

    def _lookup(self, path: str, *, follow: bool) -> tuple[str, os.stat_result] | None:
        """Resolve ``path`` the way the kernel would for the identity; None on any lookup error."""
        names = [n for n in path.split("/") if n]
        cur, cur_st = "/", _lstat("/")
        links = 0
        while names:
            name = names.pop(0)
            if name == ".":
                continue
            if not stat.S_ISDIR(cur_st.st_mode) or not self._permits(cur, cur_st, 1):
                return None  # ENOTDIR / EACCES
            if name == "..":
                cur = os.path.dirname(cur)
                cur_st = _lstat(cur)
                continue
            nxt = os.path.join(cur, name)
            try:
                st = _lstat(nxt)
            except FileNotFoundError:
                return None
            if stat.S_ISLNK(st.st_mode) and (names or follow):
                links += 1
                if links > _MAX_SYMLINKS:
                    return None  # ELOOP
                target = os.readlink(nxt)
                names[:0] = [n for n in target.split("/") if n]
                if target.startswith("/"):
                    cur, cur_st = "/", _lstat("/")
                continue
            cur, cur_st = nxt, st
        return cur, cur_st


def _lstat(path: str) -> os.stat_result:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(path) from None
    except OSError as exc:
        raise _Undecidable(f"the daemon itself cannot look at {path}: {exc.strerror}") from exc


def _has_acl(path: str) -> bool:
    try:
        os.getxattr(path, "system.posix_acl_access", follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return False
        raise _Undecidable(f"cannot read the ACL of {path}: {exc.strerror}") from exc
    return True
