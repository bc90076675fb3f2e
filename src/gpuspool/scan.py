"""The intake scanner: everything intake learns from a job's own files, read as the submitter.

The root daemon reads one thing a submitter controls, the job file. Whether the input can be
read, the output folder written and the output is absent, whether a tokenizer path exists, and
how long the longest clip is (audio headers, for the memory need) are all answered by this
short-lived process, ``gpuspool.scan`` under ``python -I`` (:func:`scanner_argv`), started by
:class:`ScanProcess`:

1. it reads its request (a JSON document the daemon wrote to an anonymous file) from stdin,
2. imports what it needs, lowers its resource limits (``RLIMIT_AS``, ``RLIMIT_CPU``,
   ``RLIMIT_NOFILE``, ``RLIMIT_FSIZE``, ``RLIMIT_CORE``), soft and hard,
3. drops to the job's uid, gid and groups (when it starts as root), in ``/``, with a minimal
   environment, before it touches any user path; after the switch the kernel makes it
   undumpable, so the submitter cannot ptrace it,
4. opens only regular files, without blocking (a FIFO or a device is refused, never waited
   on), reads at most ``max_lines`` lines / ``max_bytes`` bytes of the input and at most
   ``max_line_bytes`` of any line, and
5. writes one bounded JSON answer on stdout and exits.

The daemon never waits for it (:meth:`ScanProcess.poll` is non-blocking), kills it after a
wall-clock timeout, and treats its answer as untrusted (:func:`parse_answer`: validated, every
string and number bounded). Torch-free; the child imports ``soundfile`` only.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import resource
import signal
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Longest reason string an answer may carry (longer ones are cut, by both sides).
MAX_TEXT = 500
#: Most bytes of an answer the daemon reads (per job in the batch, plus a base).
ANSWER_BYTES_PER_JOB = 4096
#: Most bytes of the scanner's stderr the daemon keeps (for a crash's reason).
MAX_STDERR = 4096
#: Largest duration (s) an answer may claim for one clip: a week. Anything above is garbage.
MAX_CLIP_S = 7 * 24 * 3600.0
#: Most lines an answer may claim to have counted.
MAX_LINES = 10**9
#: The environment the scanner runs with (``-I`` makes Python ignore ``PYTHON*`` anyway).
SCAN_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
}
#: Bytes per sample of the uncompressed ``soundfile`` subtypes: their data is at least
#: frames × channels × this, so a header cannot claim more audio than the file holds.
PCM_BYTES = {
    "PCM_S8": 1, "PCM_U8": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4,
    "FLOAT": 4, "DOUBLE": 8, "ULAW": 1, "ALAW": 1,
}  # fmt: skip
#: Containers whose audio data is stored uncompressed (``soundfile`` format names).
RAW_CONTAINERS = frozenset({"WAV", "WAVEX", "AIFF", "AU", "RAW", "W64", "RF64", "NIST", "IRCAM"})
#: Sample rate the tokenizer encodes at (as ``extract.headers``; kept here so the child
#: imports nothing of the worker).
MODEL_SAMPLE_RATE = 24000


# --- the child --------------------------------------------------------------------------------


class _Bad(Exception):
    """A path or audio file that cannot be used; the message says why, in words."""


def _cut(text: str) -> str:
    text = text.replace("\n", " ").replace("\r", " ")
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 3] + "..."


def _open_regular(path: str, what: str, user: str) -> int:
    """An fd of the regular file ``path``, opened without blocking; _Bad says why not."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.EACCES and _visible(path):
            raise _Bad(f"{user} may not read {what} {path}") from None
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.ELOOP):
            # Said alike, whether missing or out of reach: nothing about a path the user
            # cannot reach is told (nor known: this process runs as the user).
            raise _Bad(f"{what} {path} does not exist or {user} cannot reach it") from None
        if exc.errno == errno.ENXIO:  # a socket, or a FIFO with no writer on some systems
            raise _Bad(f"{what} {path} is not a file (a socket or device)") from None
        raise _Bad(f"{what} {path}: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _Bad(f"{what} {path} is not a file ({file_kind(mode)})")
    return fd


def _visible(path: str) -> bool:
    """Whether this process can see that ``path`` exists (it may still not read it)."""
    try:
        os.stat(path)
    except OSError:
        return False
    return True


def file_kind(mode: int) -> str:
    """What a file that is not a regular one is, in words (the spool's refusals use it too)."""
    for test, label in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return label
    return "not a regular file"


def check_output(path: str, user: str) -> str | None:
    """None if this process may create ``path`` (absent; its folder writable); else why not."""
    parent = os.path.dirname(path) or "/"
    try:
        st = os.stat(parent)
    except OSError:
        return f"output folder {parent} does not exist or {user} cannot reach it"
    if not stat.S_ISDIR(st.st_mode):
        return f"output folder {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{user} may not write to the output folder {parent}"
    try:
        os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"output {path}: {exc.strerror}"
    return f"output {path} already exists"


def check_tokenizer(tokenizer: str, user: str) -> str | None:
    """A tokenizer given as a path must exist for this process; a hub id is not checked."""
    if not tokenizer.startswith("/"):
        return None
    try:
        os.stat(tokenizer)
    except OSError:
        return f"tokenizer {tokenizer} does not exist or {user} cannot reach it"
    return None


def clip_samples(path: str, sf: Any, user: str) -> int:
    """Length at 24 kHz of an audio file, from its header; _Bad if unusable.

    The file is opened as a regular file without blocking, and the header's claim is checked:
    an uncompressed container cannot hold more frames than its size allows (a 4 KB WAV cannot
    hold 12 hours), and a compressed one must have a frame where its header says it ends.
    """
    fd = _open_regular(path, "audio file", user)
    try:
        size = os.fstat(fd).st_size
        try:
            with sf.SoundFile(fd, closefd=False) as f:
                frames, sr, channels = int(f.frames), int(f.samplerate), max(1, int(f.channels))
                width = PCM_BYTES.get(str(f.subtype)) if f.format in RAW_CONTAINERS else None
                if width is not None and frames * channels * width > size:
                    held = size / (channels * width) / max(1, sr)
                    raise _Bad(
                        f"header claims {frames / max(1, sr):.1f} s of audio but the file"
                        f" ({size} bytes) holds at most {held:.1f} s"
                    )
                if width is None and frames > 0 and not _ends_where_claimed(f, frames):
                    raise _Bad(
                        f"header claims {frames / max(1, sr):.1f} s of audio but the audio"
                        " ends earlier"
                    )
        except _Bad:
            raise
        except Exception as exc:
            lines = str(exc).strip().splitlines()
            raise _Bad(
                f"unreadable audio: {_cut(lines[-1] if lines else type(exc).__name__)}"
            ) from None
    finally:
        os.close(fd)
    if sr <= 0:
        raise _Bad(f"unreadable audio: sample rate {sr}")
    if frames <= 0:
        raise _Bad("empty audio (0 samples)")
    if sr == MODEL_SAMPLE_RATE:
        return frames
    return math.ceil(frames * (float(MODEL_SAMPLE_RATE) / sr))


def _ends_where_claimed(f: Any, frames: int) -> bool:
    """Whether a compressed file has its last claimed frame (one seek, one frame decoded)."""
    try:
        f.seek(frames - 1)
        return len(f.read(1)) == 1
    except Exception:
        return False


def _lines(fd: int, max_lines: int, max_bytes: int, max_line: int) -> Any:
    """Yield (line number, bytes or None for an over-long line); stop at the caps.

    Yields ("truncated", reason) last when a cap stopped it early. Never holds more than
    ``max_line`` bytes of one line plus one chunk, and copies each byte a bounded number of times.
    """
    buf = b""
    lineno = 0
    total = 0
    skipping = False
    while True:
        want = min(1 << 20, max_bytes - total)
        if want <= 0 and os.read(fd, 1):
            yield "truncated", f"read only the first {max_bytes} bytes of the input"
            return
        chunk = os.read(fd, want) if want > 0 else b""
        if not chunk:
            break
        total += len(chunk)
        buf += chunk
        pos = 0
        while True:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                break
            lineno += 1
            yield lineno, (None if skipping or nl - pos > max_line else buf[pos:nl])
            pos = nl + 1
            skipping = False
            if lineno >= max_lines:
                yield "truncated", f"read only the first {max_lines} lines of the input"
                return
        buf = buf[pos:]
        if len(buf) > max_line:
            buf, skipping = b"", True  # a line longer than allowed: drop it as it comes
    if buf or skipping:
        yield lineno + 1, (None if skipping else buf)


def scan_job(job: dict[str, Any], limits: dict[str, int], sf: Any, user: str) -> dict[str, Any]:
    """Check one job's paths and scan its input, as this process's user."""
    out: dict[str, Any] = {"key": job["key"], "problem": None, "lines": 0, "bad": 0,
                           "longest_s": 0.0, "total_s": 0.0, "note": None}  # fmt: skip
    inp = str(job["input"])
    if job.get("judge_for") is not None:
        problem = _judge_for(job["judge_for"], inp, str(job["output"]))
        if problem is not None:
            out["problem"] = _cut(problem)
            return out
    try:
        fd = _open_regular(inp, "input", user)
    except _Bad as exc:
        out["problem"] = _cut(str(exc))
        return out
    try:
        problem = check_output(str(job["output"]), user) or check_tokenizer(
            str(job["tokenizer"]), user
        )
        if problem is not None:
            out["problem"] = _cut(problem)
            return out
        base = os.path.dirname(os.path.realpath(inp))
        first_bad: str | None = None
        for lineno, raw in _lines(
            fd, limits["max_lines"], limits["max_bytes"], limits["max_line_bytes"]
        ):
            if lineno == "truncated":
                out["note"] = _cut(str(raw))
                break
            why = _line_problem(raw, base, sf, user, limits["max_line_bytes"], out)
            if why is not None:
                out["bad"] += 1
                first_bad = first_bad or f"line {lineno}: {why}"
        if first_bad is not None and out["note"] is None:
            out["note"] = _cut(f"{out['bad']} bad line(s); first: {first_bad}")
    finally:
        os.close(fd)
    return out


def _judge_for(who: dict[str, Any], inp: str, output: str) -> str | None:
    """A daemon that is not root cannot become the submitter: judge their rights from mode
    bits (``privileges``' ``modebits`` method), on top of this process's own checks."""
    from gpuspool import privileges

    ident = privileges.Identity(
        int(who["uid"]), int(who["gid"]), tuple(int(g) for g in who["groups"]),
        str(who["name"]), "/",
    )  # fmt: skip
    return privileges.check_input_readable(
        ident, Path(inp), method="modebits"
    ) or privileges.check_output_writable(ident, Path(output), method="modebits")


def _line_problem(
    raw: bytes | None, base: str, sf: Any, user: str, max_line: int, out: dict[str, Any]
) -> str | None:
    """Count one line into ``out``; the reason it is bad, or None (blank or good)."""
    if raw is None:
        out["lines"] += 1
        return f"line longer than {max_line} bytes"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        out["lines"] += 1
        return "line is not valid UTF-8"
    if not text.strip():
        return None
    out["lines"] += 1
    try:
        record = json.loads(text)
    except (ValueError, RecursionError):
        return "invalid JSON"
    if not isinstance(record, dict):
        return "line is not a JSON object"
    audio = record.get("audio")
    if not isinstance(audio, str) or not audio or "\x00" in audio:
        return "'audio' is not a non-empty string"
    path = os.path.expanduser(audio) if audio.startswith("~") else audio
    if not path.startswith("/"):
        path = os.path.join(base, path)
    try:
        seconds = clip_samples(path, sf, user) / MODEL_SAMPLE_RATE
    except _Bad as exc:
        return str(exc)
    out["longest_s"] = max(out["longest_s"], seconds)
    out["total_s"] += seconds
    return None


def _limit(which: int, value: int) -> None:
    """Lower a resource limit, soft and hard (lowering is always allowed; raising never)."""
    hard = resource.getrlimit(which)[1]
    if hard == resource.RLIM_INFINITY or value < hard:
        hard = value
    resource.setrlimit(which, (min(value, hard), hard))


def _drop_to(identity: dict[str, Any]) -> None:
    """Become the job's user (uid, gid, groups) for good; SystemExit if that fails."""
    uid, gid, groups = (
        int(identity["uid"]),
        int(identity["gid"]),
        [int(g) for g in identity["groups"]],
    )
    if os.geteuid() == uid and os.getegid() == gid:
        return
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise SystemExit("could not switch to the job's user")


def main() -> int:
    """Read the request on stdin, scan each job, write one JSON answer on stdout."""
    request = json.loads(sys.stdin.buffer.read(8 << 20))
    os.chdir("/")
    import soundfile as sf  # imported before the switch: its files are the daemon's own

    limits = {k: int(v) for k, v in request["limits"].items()}
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_FSIZE, 0)
    _limit(resource.RLIMIT_NOFILE, 64)
    _limit(resource.RLIMIT_CPU, max(1, limits["cpu_s"]))
    _limit(resource.RLIMIT_AS, limits["memory_mib"] << 20)
    identity = request.get("identity")
    if identity is not None:
        _drop_to(identity)
    user = str(request.get("user") or os.geteuid())
    answers = [scan_job(job, limits, sf, user) for job in request["jobs"]]
    sys.stdout.write(json.dumps({"jobs": answers}))
    sys.stdout.flush()
    return 0


# --- the daemon's side ------------------------------------------------------------------------


@dataclass(frozen=True)
class ScanLimits:
    """How much one scan may read, use and take."""

    timeout_s: float = 60.0
    max_lines: int = 200_000
    max_bytes: int = 256 << 20
    max_line_bytes: int = 1 << 20
    memory_mib: int = 1024

    def wire(self) -> dict[str, int]:
        return {
            "max_lines": self.max_lines,
            "max_bytes": self.max_bytes,
            "max_line_bytes": self.max_line_bytes,
            "memory_mib": self.memory_mib,
            "cpu_s": max(1, math.ceil(self.timeout_s)),
        }


@dataclass(frozen=True)
class ScanJob:
    """One job of a scan request: the paths its file names (already schema-checked)."""

    key: str
    input: str
    output: str
    tokenizer: str
    #: uid, gid, groups and name of a submitter this process cannot become (daemon not root),
    #: whose rights are then judged from mode bits; None when the scan runs as the job's user.
    judge_for: dict[str, Any] | None = field(default=None)


@dataclass(frozen=True)
class ScanResult:
    """A validated answer for one job."""

    problem: str | None
    lines: int
    bad: int
    longest_s: float
    total_s: float
    note: str | None


def _anonymous_file() -> int:
    """An fd of a file no one else can open (memfd; an unlinked temporary file if refused)."""
    try:
        return os.memfd_create("gpuspool-scan-request", os.MFD_CLOEXEC)
    except OSError:
        import tempfile

        return os.dup(tempfile.TemporaryFile().fileno())


def scanner_argv() -> list[str]:
    """``python -I`` running ``gpuspool.scan`` from the daemon's own import path: isolated mode
    ignores ``PYTHON*`` variables and the current folder, so the scanner imports exactly the
    code the daemon runs, whether it is installed in a venv or found through ``PYTHONPATH``."""
    bootstrap = (
        "import sys; sys.path[:] = sys.argv[1:]; sys.argv[1:] = [];"
        " from gpuspool.scan import main; raise SystemExit(main())"
    )
    return [sys.executable, "-I", "-c", bootstrap, *(p for p in sys.path if p)]


class ScanProcess:
    """One running scanner, for a batch of jobs of one user; polled, never waited on."""

    def __init__(
        self,
        jobs: list[ScanJob],
        limits: ScanLimits,
        *,
        identity: Any | None,
        started: float,
        argv: list[str] | None = None,
    ) -> None:
        self.jobs = jobs
        self.limits = limits
        self.deadline = started + limits.timeout_s
        request: dict[str, Any] = {
            "limits": limits.wire(),
            "identity": None,
            "user": str(identity) if identity is not None else None,
            "jobs": [vars(j) for j in jobs],
        }
        if identity is not None and (identity.uid, identity.gid) != (os.geteuid(), os.getegid()):
            request["identity"] = {"uid": identity.uid, "gid": identity.gid,
                                   "groups": list(identity.groups)}  # fmt: skip
        stdin = _anonymous_file()
        try:
            os.write(stdin, json.dumps(request).encode())
            os.lseek(stdin, 0, os.SEEK_SET)
            self.proc = subprocess.Popen(
                argv or scanner_argv(),
                stdin=stdin,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd="/",
                env=dict(SCAN_ENV),
                start_new_session=True,
                close_fds=True,
            )
        finally:
            os.close(stdin)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        for stream in (self.proc.stdout, self.proc.stderr):
            os.set_blocking(stream.fileno(), False)
        self._out = bytearray()
        self._err = bytearray()
        self._cap = 1024 + ANSWER_BYTES_PER_JOB * len(jobs)

    def _drain(self) -> str | None:
        """Read what the scanner wrote so far; a failure if its answer is over the cap."""
        assert self.proc.stdout is not None and self.proc.stderr is not None
        for stream, buf, cap in (
            (self.proc.stdout, self._out, self._cap + 1),
            (self.proc.stderr, self._err, MAX_STDERR),
        ):
            while True:
                try:
                    chunk = os.read(stream.fileno(), 65536)
                except BlockingIOError:
                    break
                except OSError:
                    break
                if not chunk:
                    break
                buf += chunk
                if len(buf) <= cap:
                    continue
                if buf is self._err:
                    del buf[: len(buf) - cap]  # keep the end: a traceback's last line
                    continue
                del buf[cap:]
                return f"its answer was longer than {self._cap} bytes"
        return None

    def poll(self, now: float) -> dict[str, ScanResult] | str | None:
        """Answers by job key, a failure in words, or None while it runs (never blocks)."""
        too_long = self._drain()
        if too_long is not None:
            self.kill()
            return too_long
        code = self.proc.poll()
        if code is None:
            if now < self.deadline:
                return None
            self.kill()
            return f"it took longer than {self.limits.timeout_s:g} s"
        too_long = self._drain()
        self._close()
        if too_long is not None:
            return too_long
        if code != 0:
            return self._crash(code)
        try:
            return parse_answer(bytes(self._out), [j.key for j in self.jobs])
        except ValueError as exc:
            return f"its answer was not valid: {_cut(str(exc))}"

    def _crash(self, code: int) -> str:
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            what = f"it was killed by {name}"
            if -code in (signal.SIGXCPU, signal.SIGKILL):
                what += " (a resource limit)"
        else:
            what = f"it exited with status {code}"
        last = bytes(self._err).decode("utf-8", "replace").strip().splitlines()
        if last:
            what += f": {_cut(last[-1])}"
        return what

    def kill(self) -> None:
        """End the scanner (its whole session) and reap it."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):  # SIGKILL is quick
                self.proc.wait(timeout=5)
        self._close()

    def _close(self) -> None:
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None and not stream.closed:
                stream.close()


def parse_answer(data: bytes, keys: list[str]) -> dict[str, ScanResult]:
    """Validate a scanner's answer: one bounded result per requested key; ValueError if not."""
    from pydantic import BaseModel, ConfigDict, Field, ValidationError

    class _Result(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        key: str = Field(max_length=64)
        problem: str | None = Field(None, max_length=MAX_TEXT)
        lines: int = Field(ge=0, le=MAX_LINES)
        bad: int = Field(ge=0, le=MAX_LINES)
        longest_s: float = Field(ge=0.0, le=MAX_CLIP_S, allow_inf_nan=False)
        total_s: float = Field(ge=0.0, le=MAX_CLIP_S * MAX_LINES, allow_inf_nan=False)
        note: str | None = Field(None, max_length=MAX_TEXT)

    class _Answer(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        jobs: list[_Result] = Field(max_length=len(keys))

    try:
        answer = _Answer.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid"}
        where = ".".join(str(p) for p in first["loc"]) or "(top)"
        raise ValueError(f"{where}: {first['msg']}") from None
    out = {r.key: ScanResult(r.problem, r.lines, r.bad, r.longest_s, r.total_s, r.note)
           for r in answer.jobs if r.key in keys}  # fmt: skip
    missing = [k for k in keys if k not in out]
    if missing:
        raise ValueError(f"no answer for {len(missing)} job(s)")
    return out


if __name__ == "__main__":
    sys.exit(main())
