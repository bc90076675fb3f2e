"""Crash-safe, resumable, in-order output (torch-free).

Files beside OUT:

- ``OUT.partial``: finished output lines, in input order (a prefix of the final OUT).
- ``OUT.partial.pending``: results finished out of order (a later line of the sorted window
  done before an earlier one), one JSON record a line, so a kill loses at most the batch in
  flight.
- ``REPORT.partial``: the skip report's prefix, in input order.
- ``OUT.partial.ckpt``: JSON, replaced atomically (write, fsync, rename, fsync folder). It names
  the byte length of each file above that is valid, the next input line to write and its byte
  offset in the input, the counters, and a fingerprint of the arguments that decide the codes.

Every update appends and fsyncs the data files first and only then replaces the checkpoint, so
the checkpoint never points past data on disk. On resume each file is cut back to the
checkpoint's length: bytes written after the last checkpoint are dropped, never duplicated.
When everything is written the checkpoint is marked complete, OUT.partial is renamed to OUT,
and the side files are removed.

On a shared ledger each of those writes (the cut back on resume included) happens inside the
``guard`` the worker hands in: the owner file's lock, taken after checking that this attempt
still owns the output (``gpuspool.extract.owner``). A write and its checkpoint are therefore
one step as far as another attempt is concerned: it sees all of it or none.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from gpuspool.protocol import partial_path

CKPT_VERSION = 1

Kind = Literal["out", "skip", "blank"]
#: Wraps every write of the output's files (see the module docstring).
Guard = Callable[[], AbstractContextManager[None]]


def _ckpt_path(out: Path) -> Path:
    return Path(str(out) + ".partial.ckpt")


def _pending_path(out: Path) -> Path:
    return Path(str(out) + ".partial.pending")


def _report_partial(report: Path) -> Path:
    return Path(str(report) + ".partial")


@dataclass(frozen=True)
class Entry:
    """One finished input line: an output line, a skip-report line, or nothing (blank)."""

    line: int
    end_offset: int
    kind: Kind
    text: str = ""
    audio_s: float = 0.0


@dataclass
class Checkpoint:
    """What the checkpoint file holds."""

    fingerprint: dict[str, Any]
    next_line: int = 1
    input_offset: int = 0
    partial_bytes: int = 0
    report_bytes: int = 0
    pending_bytes: int = 0
    lines_done: int = 0
    lines_skipped: int = 0
    audio_s_done: float = 0.0
    complete: bool = False
    version: int = CKPT_VERSION


class ResumeMismatch(Exception):
    """A checkpoint exists but was written by a run with different arguments or input."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _open_at(path: Path, size: int) -> Any:
    """Open ``path`` for appending after cutting it to ``size`` bytes (creating it if needed)."""
    f = open(path, "a+b")  # noqa: SIM115  (kept open for the writer's life)
    f.truncate(size)
    f.seek(size)
    return f


class OrderedWriter:
    """Accepts finished lines in any order; writes them in input order with checkpoints."""

    def __init__(
        self,
        out: Path,
        report: Path,
        fingerprint: dict[str, Any],
        resume: bool = True,
        guard: Guard = contextlib.nullcontext,
    ):
        self.out = out
        self.guard = guard
        self.report = report
        self.partial = partial_path(out)
        self.ckpt_path = _ckpt_path(out)
        self.pending_path = _pending_path(out)
        self.report_partial = _report_partial(report)
        self.ready: dict[int, Entry] = {}
        self.resumed = False
        ck = _read_ckpt(self.ckpt_path) if resume else None
        if ck is not None and ck.fingerprint != fingerprint:
            raise ResumeMismatch(
                f"{self.partial} was written by a run with other arguments or another input; "
                "pass --no-resume to start over (a job: restart = true, or submit --restart)"
            )
        if ck is None or ck.complete:
            ck = Checkpoint(fingerprint=fingerprint)
        else:
            self.resumed = ck.next_line > 1 or ck.pending_bytes > 0
        self.ck = ck
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.report.parent.mkdir(parents=True, exist_ok=True)
        if self.resumed:
            self._load_pending()
        with guard():
            self._f_out = _open_at(self.partial, ck.partial_bytes)
            self._f_rep = _open_at(self.report_partial, ck.report_bytes)
            self._f_pend = _open_at(self.pending_path, ck.pending_bytes)
            self._write_ckpt()

    # -- state ---------------------------------------------------------------------------------
    @property
    def next_line(self) -> int:
        """First input line not yet written to the partial file."""
        return self.ck.next_line

    @property
    def input_offset(self) -> int:
        """Byte offset of :attr:`next_line` in the input."""
        return self.ck.input_offset

    def done_lines(self) -> set[int]:
        """Lines at or after :attr:`next_line` that are already finished (from pending)."""
        return set(self.ready)

    # -- updates -------------------------------------------------------------------------------
    def add(self, entries: list[Entry]) -> None:
        """Record finished lines; write the in-order prefix; persist the rest; checkpoint."""
        new = [e for e in entries if e.line >= self.ck.next_line and e.line not in self.ready]
        if not new:
            return
        with self.guard():
            self._add(new)

    def _add(self, new: list[Entry]) -> None:
        for e in new:
            self.ready[e.line] = e
        out_chunks: list[str] = []
        rep_chunks: list[str] = []
        flushed: set[int] = set()
        while self.ck.next_line in self.ready:
            e = self.ready.pop(self.ck.next_line)
            flushed.add(e.line)
            if e.kind == "out":
                out_chunks.append(e.text + "\n")
                self.ck.lines_done += 1
                self.ck.audio_s_done += e.audio_s
            elif e.kind == "skip":
                rep_chunks.append(e.text + "\n")
                self.ck.lines_skipped += 1
            self.ck.next_line = e.line + 1
            self.ck.input_offset = e.end_offset
        if out_chunks:
            self._f_out.write("".join(out_chunks).encode("utf-8"))
            self._f_out.flush()
            os.fsync(self._f_out.fileno())
            self.ck.partial_bytes = self._f_out.tell()
        if rep_chunks:
            self._f_rep.write("".join(rep_chunks).encode("utf-8"))
            self._f_rep.flush()
            os.fsync(self._f_rep.fileno())
            self.ck.report_bytes = self._f_rep.tell()
        if not self.ready:
            # Nothing pending any more: empty the pending file (checkpoint first).
            if self.ck.pending_bytes:
                self.ck.pending_bytes = 0
                self._write_ckpt()
                self._f_pend.truncate(0)
                self._f_pend.seek(0)
            else:
                self._write_ckpt()
            return
        held = [e for e in new if e.line not in flushed]
        if held:
            recs = "".join(
                json.dumps(
                    {"i": e.line, "e": e.end_offset, "k": e.kind, "t": e.text, "a": e.audio_s},
                    ensure_ascii=False,
                )
                + "\n"
                for e in held
            )
            self._f_pend.write(recs.encode("utf-8"))
            self._f_pend.flush()
            os.fsync(self._f_pend.fileno())
            self.ck.pending_bytes = self._f_pend.tell()
        self._write_ckpt()

    def finish(self, after: Callable[[], None] | None = None) -> None:
        """Rename the partial file to OUT (and the report, if any line was skipped); then, still
        inside the guard, ``after`` (the worker removes the owner file there)."""
        if self.ready:
            raise RuntimeError(f"cannot finish: lines {sorted(self.ready)[:5]}... not written")
        with self.guard():
            self.ck.complete = True
            self._write_ckpt()
            for f in (self._f_out, self._f_rep, self._f_pend):
                f.close()
            _complete_files(self.out, self.report, self.ck)
            if after is not None:
                after()

    def close(self) -> None:
        """Close the files, leaving the partial state for a later resume."""
        for f in (self._f_out, self._f_rep, self._f_pend):
            if not f.closed:
                f.close()

    # -- internals -----------------------------------------------------------------------------
    def _write_ckpt(self) -> None:
        tmp = Path(str(self.ckpt_path) + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(asdict(self.ck), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.ckpt_path)
        _fsync_dir(self.ckpt_path.parent)

    def _load_pending(self) -> None:
        try:
            with open(self.pending_path, "rb") as f:
                data = f.read(self.ck.pending_bytes)
        except OSError:
            data = b""
        for raw in data.splitlines():
            r = json.loads(raw)
            if r["i"] >= self.ck.next_line:
                self.ready[r["i"]] = Entry(r["i"], r["e"], r["k"], r["t"], r["a"])


def _read_ckpt(path: Path) -> Checkpoint | None:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or raw.get("version") != CKPT_VERSION:
        return None
    try:
        return Checkpoint(**raw)
    except TypeError:
        return None


def _complete_files(out: Path, report: Path, ck: Checkpoint) -> None:
    """The end of a finished run, after its checkpoint is marked complete; safe to repeat."""
    partial, report_partial = partial_path(out), _report_partial(report)
    if partial.exists():
        os.replace(partial, out)
    if ck.lines_skipped and report_partial.exists():
        os.replace(report_partial, report)
    else:
        report_partial.unlink(missing_ok=True)
    _fsync_dir(out.parent)
    _pending_path(out).unlink(missing_ok=True)
    _ckpt_path(out).unlink(missing_ok=True)
    _fsync_dir(out.parent)


def finish_completed(out: Path, report: Path) -> Checkpoint | None:
    """Finish the clean-up of a run that completed but died before the end of it.

    Returns that run's checkpoint, or None if no complete run is left behind (then nothing is
    touched). Wherever the earlier run stopped after marking its checkpoint complete, its
    output (and skip report) end up under their final names.
    """
    ck = _read_ckpt(_ckpt_path(out))
    if ck is None or not ck.complete or not (out.exists() or partial_path(out).exists()):
        return None
    _complete_files(out, report, ck)
    return ck


__all__ = [
    "Checkpoint",
    "Entry",
    "OrderedWriter",
    "ResumeMismatch",
    "finish_completed",
    "partial_path",
]
