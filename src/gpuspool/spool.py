"""The spool directory: the only module that touches it.

Layout (under ``spool_dir``)::

    tmp/        writers create job files here ...
    incoming/   ... then rename them in (atomic); the daemon takes them from here
    accepted/   job files taken into the ledger, named <job id>.<ext>
    rejected/   refused entries, each with <name>.reason beside it

Entries of ``incoming/`` are opened without following links and without blocking, and must be
regular files with one link, at most ``max_bytes`` and not group- or world-writable (as cron
refuses a crontab others could edit: the file's owner is who the job runs as); anything else is
moved (never followed or read) to ``rejected/``. Names starting with ``.`` are ignored: writers
may use them while writing. This is the only thing a submitter controls that the daemon reads
itself; the files a job names are read by the intake scanner as the submitter (``scan.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import time
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gpuspool.models import JobSpec
from gpuspool.scan import file_kind

SUFFIXES = (b".toml", b".json")
#: Folders a job file is read from: new submissions, and accepted ones requeued after their
#: ledger row was lost (the spool is the source of truth).
Folder = Literal["incoming", "accepted"]


@dataclass(frozen=True, slots=True)
class RawJob:
    """A job file read safely from ``incoming/``, not yet validated."""

    name: bytes
    job_id: str
    data: dict[str, Any]
    submitter_uid: int
    suffix: str


@dataclass(frozen=True, slots=True)
class RejectedJob:
    """A job the daemon refused: its id, its ``.reason`` file and that file's fields."""

    job_id: str
    path: Path
    fields: dict[str, str]
    at: float


@dataclass(frozen=True, slots=True)
class Refusal:
    """An entry of ``incoming/`` that cannot be a job, and why."""

    name: bytes
    reason: str


def display_name(name: bytes) -> str:
    """A log-safe rendering of an entry name (newlines and bad bytes escaped)."""
    text = name.decode("utf-8", errors="backslashreplace")
    return text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text


def parse_job_bytes(content: bytes, suffix: str) -> dict[str, Any]:
    """Decode a job file's bytes (UTF-8 TOML or JSON) into a dict; ValueError says why not."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text: {exc}") from exc
    try:
        data: Any = tomllib.loads(text) if suffix == ".toml" else json.loads(text)
    except RecursionError as exc:
        raise ValueError("nested too deeply") from exc
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not valid {suffix[1:].upper()}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"top level must be a table/object, not {type(data).__name__}")
    return data


def validate_spec(data: dict[str, Any]) -> JobSpec:
    """The strict schema check; ValueError names each bad field."""
    from pydantic import ValidationError

    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}"
            for err in exc.errors()[:10]
        )
        raise ValueError(f"invalid job: {problems}") from exc
    except RecursionError as exc:
        raise ValueError("invalid job: nested too deeply") from exc


class Spool:
    """The spool directory on disk."""

    def __init__(self, root: Path, *, max_bytes: int = 65536) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.incoming = root / "incoming"
        self.staging = root / "tmp"
        self.accepted = root / "accepted"
        self.rejected = root / "rejected"
        self._incoming_b = bytes(self.incoming)

    def ensure_dirs(self) -> None:
        """Create missing folders (the installer sets their owners and modes)."""
        for d in (self.incoming, self.staging, self.accepted, self.rejected):
            d.mkdir(parents=True, exist_ok=True)

    def pending(self) -> list[bytes]:
        """Names in ``incoming/`` to look at, oldest first by name order of discovery."""
        try:
            names = os.listdir(bytes(self.incoming))
        except FileNotFoundError:
            return []
        return sorted(n for n in names if not n.startswith(b"."))

    def folder(self, which: Folder) -> Path:
        return self.incoming if which == "incoming" else self.accepted

    def accepted_names(self) -> list[bytes]:
        """Names in ``accepted/`` (``<job id>.<ext>``)."""
        try:
            names = os.listdir(bytes(self.accepted))
        except FileNotFoundError:
            return []
        return sorted(n for n in names if not n.startswith(b"."))

    def owner(self, name: bytes, folder: Folder = "incoming") -> int | None:
        """The uid owning an entry (not following links), or None if it is gone."""
        where = self._incoming_b if folder == "incoming" else bytes(self.accepted)
        try:
            return os.lstat(where + b"/" + name).st_uid
        except OSError:
            return None

    def read(self, name: bytes, folder: Folder = "incoming") -> RawJob | Refusal:
        """Open ``<folder>/<name>`` safely and parse it, or say why it is refused.

        A file read from ``accepted/`` keeps the job id it was accepted under (its stem).
        """
        suffix = os.path.splitext(name)[1].lower()
        if suffix not in SUFFIXES:
            return Refusal(name, "job files must end in .toml or .json")
        kept_id = None
        if folder == "accepted":
            kept_id = os.path.splitext(name)[0].decode("ascii", "replace")
            if len(kept_id) != 12 or set(kept_id) - set("0123456789abcdef"):
                return Refusal(name, "not named <job id>.<ext> as accepted files are")
        dir_fd = os.open(self.folder(folder), os.O_RDONLY | os.O_DIRECTORY)
        try:
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
            try:
                fd = os.open(name, flags, dir_fd=dir_fd)
            except OSError as exc:
                try:
                    mode = os.lstat(name, dir_fd=dir_fd).st_mode
                except OSError:
                    mode = stat.S_IFREG
                if stat.S_ISLNK(mode):
                    return Refusal(name, "is a symbolic link (links are never followed)")
                if not stat.S_ISREG(mode):  # e.g. a socket, which cannot be opened at all
                    return Refusal(name, f"not a regular file ({file_kind(mode)})")
                return Refusal(name, f"cannot open: {exc.strerror}")
            try:
                got = self._read_fd(name, fd, suffix.decode())
            finally:
                os.close(fd)
        finally:
            os.close(dir_fd)
        if kept_id is not None and isinstance(got, RawJob):
            return RawJob(got.name, kept_id, got.data, got.submitter_uid, got.suffix)
        return got

    def _read_fd(self, name: bytes, fd: int, suffix: str) -> RawJob | Refusal:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            return Refusal(name, f"not a regular file ({file_kind(before.st_mode)})")
        if before.st_nlink != 1:
            return Refusal(name, f"has {before.st_nlink} hard links (must have exactly one)")
        if before.st_size > self.max_bytes:
            return Refusal(name, f"too large: {before.st_size} bytes > {self.max_bytes}")
        if before.st_mode & 0o022:
            return Refusal(
                name,
                f"is group- or world-writable (mode {stat.S_IMODE(before.st_mode):04o}): someone"
                " other than its owner could have written it; make it writable by its owner only"
                " (chmod go-w)",
            )
        chunks = []
        remaining = self.max_bytes + 1
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 65536))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        content = b"".join(chunks)
        after = os.fstat(fd)
        if len(content) > self.max_bytes:
            return Refusal(name, f"too large: more than {self.max_bytes} bytes")
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or len(
            content
        ) != after.st_size:
            return Refusal(name, "changed while being read (write elsewhere, then rename in)")
        try:
            data = parse_job_bytes(content, suffix)
        except ValueError as exc:
            return Refusal(name, str(exc))
        return RawJob(name, job_id_for(name, before, content), data, before.st_uid, suffix)

    def accept(self, raw: RawJob) -> Path:
        """Move an accepted job file to ``accepted/<job id><ext>``; returns the new path."""
        dest = self.accepted / f"{raw.job_id}{raw.suffix}"
        os.rename(os.path.join(bytes(self.incoming), raw.name), bytes(dest))
        return dest

    def reject(
        self, name: bytes, reason: str, *, now: float | None = None, folder: Folder = "incoming"
    ) -> Path:
        """Move an entry (whatever it is; links are not followed) to ``rejected/`` with a reason.

        When the entry is a job file that could be read, the reason file is named
        ``<time>-<job id>-<random>.reason`` and says ``job: <id>``: the id ``submit`` printed,
        so ``gpuspool show ID`` still finds a job the daemon refused. OSError when the reason
        cannot be written or the entry not moved (a daemon-side problem: the caller retries
        later).
        """
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now if now is not None else time.time()))
        job_id = self._entry_job_id(name, folder)
        base = (
            f"{stamp}-{job_id}-{uuid.uuid4().hex[:8]}"
            if job_id
            else f"{stamp}-{uuid.uuid4().hex[:8]}"
        )
        dest = self.rejected / base
        reason_path = self.rejected / f"{base}.reason"
        job_line = f"job: {job_id}\n" if job_id else ""
        _write_atomic(
            reason_path,
            f"file: {display_name(name)}\nreason: {reason}\n{job_line}".encode(),
        )
        source = os.path.join(bytes(self.folder(folder)), name)
        with contextlib.suppress(FileNotFoundError):  # gone meanwhile: the reason still tells
            _give_reason(reason_path, os.lstat(source).st_uid)
            os.rename(source, bytes(dest))
        return reason_path

    def _entry_job_id(self, name: bytes, folder: Folder = "incoming") -> str | None:
        """The job id of ``<folder>/<name>`` if it is a readable job file (as :meth:`read` would
        compute it; an accepted file's is its stem), else None. Opened as :meth:`read` opens
        it: no links, no blocking."""
        if folder == "accepted":
            stem = os.path.splitext(name)[0].decode("ascii", "replace")
            return stem if re.fullmatch(r"[0-9a-f]{12}", stem) else None
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        try:
            dir_fd = os.open(self.incoming, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return None
        try:
            fd = os.open(name, flags, dir_fd=dir_fd)
        except (OSError, ValueError):
            return None
        finally:
            os.close(dir_fd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size > self.max_bytes:
                return None
            content = os.read(fd, self.max_bytes + 1)
            if len(content) != st.st_size:
                return None
            return job_id_for(name, st, content)
        except OSError:
            return None
        finally:
            os.close(fd)

    def find_rejected(self, ref: str) -> RejectedJob | None:
        """The newest refused job whose id is ``ref`` or starts with it (at least 4 hex digits).

        Raises PermissionError when ``rejected/`` may not be read.
        """
        if not re.fullmatch(r"[0-9a-f]{4,64}", ref):
            return None
        found = sorted(self.rejected.glob(f"*-{ref}*.reason"))
        for path in reversed(found):
            fields: dict[str, str] = {}
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                key, sep, value = line.partition(": ")
                if sep:
                    fields.setdefault(key, value)
            job_id = fields.pop("job", "")
            if job_id.startswith(ref):
                at = path.stat().st_mtime
                return RejectedJob(job_id, path, fields, at)
        return None

    def reasons_of(self, names: list[str]) -> list[tuple[str, int, str]]:
        """(name, owner uid, text) of the given ``.reason`` files of ``rejected/`` (a bounded
        read each; links not followed; one that cannot be read is left out)."""
        out = []
        for name in names:
            try:
                fd = os.open(self.rejected / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
                text = os.read(fd, 4096).decode("utf-8", errors="replace")
            finally:
                os.close(fd)
            out.append((name, st.st_uid, text))
        return out

    def reason_names(self) -> list[str]:
        """The names of the ``.reason`` files in ``rejected/`` (not their contents)."""
        try:
            return [n for n in os.listdir(self.rejected) if n.endswith(".reason")]
        except FileNotFoundError:
            return []

    def submit(self, data: dict[str, Any], *, stem: str | None = None) -> tuple[Path, str]:
        """Publish a job: write ``tmp/<name>.json``, rename it into ``incoming/``.

        Works as an ordinary member of the submitters' group, who may create files in ``tmp/``
        and ``incoming/`` (mode 1730) but not open those folders: the file itself is fsync'd,
        the folders only where the caller may open them. On any failure the file written in
        ``tmp/`` is removed. Returns the published path and the job id the daemon will give it.
        """
        if not self.staging.is_dir():
            self.staging.mkdir(parents=True, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in (stem or "job"))[:60]
        name = f"{safe}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.json"
        tmp = self.staging / name
        dest = self.incoming / name
        content = json.dumps(data, indent=2).encode()
        try:
            _write_synced(tmp, content)
            st = os.stat(tmp)
            os.rename(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(self.incoming)
        return dest, job_id_for(name.encode(), st, content)

    def prune_rejected(self, older_than: float, *, limit: int = 1000) -> int:
        """Remove up to ``limit`` entries of ``rejected/`` (and their ``.reason``) last changed
        before ``older_than``; returns how many went. Never follows a link; a folder someone
        managed to drop is left alone."""
        removed = 0
        try:
            entries = list(os.scandir(self.rejected))
        except FileNotFoundError:
            return 0
        for entry in entries:
            if removed >= limit:
                break
            try:
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode) or st.st_mtime >= older_than:
                    continue
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            removed += 1
        return removed

    def reason_files(self) -> list[Path]:
        return sorted(self.rejected.glob("*.reason"))


def job_id_for(name: bytes, st: os.stat_result, content: bytes) -> str:
    """The job id of a spool file: stable across a crash and rescan, unique per submission."""
    digest = hashlib.sha256()
    for part in (name, str(st.st_ino).encode(), str(st.st_mtime_ns).encode(), content):
        digest.update(part)
        digest.update(b"\x00")
    return digest.hexdigest()[:12]


def _write_synced(path: Path, content: bytes) -> None:
    """Create ``path`` (it must not exist) with ``content``, fsync'd."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _give_reason(path: Path, uid: int) -> None:
    """Hand a ``.reason`` file to the owner of the refused entry (mode 0400): in ``rejected/``
    (0711: nobody can list it) they can read their own reasons by name, nobody else's."""
    if os.geteuid() != 0:
        return
    os.chown(path, uid, -1)
    os.chmod(path, 0o400)


def _fsync_dir(folder: Path) -> None:
    """fsync a folder so a rename in it is durable, where the caller may open it (a submitter
    may not open the drop folders; the daemon's later rename there is what must last)."""
    try:
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except PermissionError:
        return
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _write_atomic(path: Path, content: bytes) -> None:
    """Write ``content`` to ``path`` and fsync it (and its folder)."""
    _write_synced(path, content)
    _fsync_dir(path.parent)
