"""The worker the reliability suites give the daemon: the real one, or a scripted fault.

The daemon starts every job with the same ``worker_command``; this script decides per job by the
job's ``tokenizer`` field. ``stub:<mode>[:<arg>]`` runs a scripted stand-in (below); anything else
``exec``s the real worker (``python -m gpuspool.extract``) with the same argv, in the same process,
so the daemon's pid and start time still name the job.

Modes:
    ok[:delay_s]   crash-safe and resumable like the real worker: output lines (a pure function of
                   the input lines) are appended and fsynced to ``OUT.partial``, one at a time,
                   ``delay_s`` apart; at the end ``OUT.partial`` is renamed to ``OUT``. A rerun
                   resumes after the last complete line; a rerun after the rename says "done".
    oom            exit 75 (CUDA out of memory), as the worker does.
    hang           ignore SIGTERM and never finish (only SIGKILL stops it).
    flood[:mib]    write ``mib`` MiB of junk to stdout (with and without newlines), then finish ok.
    fill           write to ``OUT.partial`` until the disk is full, then fail as the worker does.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path


def emit(**event: object) -> None:
    """Print the event (the human log) and send it on the daemon's events channel."""
    line = json.dumps(event)
    print(line, flush=True)
    fd = os.environ.get("GPUSPOOL_EVENTS_FD")
    if fd:
        os.write(int(fd), (line + "\n").encode())


def output_line(line: str) -> str:
    """The stub's output for one input line: the line's object plus deterministic codes."""
    obj = json.loads(line)
    digest = hashlib.sha256(line.encode()).digest()
    obj["audio_codes"] = [[b % 16 for b in digest[i : i + 8]] for i in range(0, 32, 8)]
    return json.dumps(obj, sort_keys=True) + "\n"


def expected_output(input_path: Path) -> bytes:
    """What an uninterrupted ``ok`` run writes for ``input_path``."""
    lines = [ln for ln in input_path.read_text().splitlines() if ln.strip()]
    return "".join(output_line(ln) for ln in lines).encode()


def _resume_point(partial: Path) -> int:
    """Complete lines already in ``partial``; a torn last line is cut off."""
    try:
        data = partial.read_bytes()
    except FileNotFoundError:
        return 0
    keep = data.rfind(b"\n") + 1
    if keep != len(data):
        with open(partial, "r+b") as f:
            f.truncate(keep)
            os.fsync(f.fileno())
    return data[:keep].count(b"\n")


def run_ok(inp: Path, out: Path, delay_s: float) -> int:
    if out.exists():
        emit(event="summary", lines_done=0, already_complete=True, peak_gpu_gib=0.5)
        return 0
    lines = [ln for ln in inp.read_text().splitlines() if ln.strip()]
    partial = Path(str(out) + ".partial")
    done = _resume_point(partial)
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    emit(event="start", lines_total=len(lines), resumed=done > 0, lines_already_done=done)
    with open(partial, "ab") as f:
        for i in range(done, len(lines)):
            if stop:
                emit(event="error", exit_code=143, reason="interrupted by SIGTERM")
                return 143
            time.sleep(delay_s)
            f.write(output_line(lines[i]).encode())
            f.flush()
            os.fsync(f.fileno())
            emit(event="progress", lines_done=i + 1, lines_total=len(lines))
    os.replace(partial, out)
    fd = os.open(out.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    emit(event="summary", lines_done=len(lines), lines_skipped=0, peak_gpu_gib=0.5)
    return 0


def run_fill(out: Path) -> int:
    partial = Path(str(out) + ".partial")
    emit(event="start", lines_total=1)
    try:
        with open(partial, "ab") as f:
            block = b"x" * 65536
            while True:
                f.write(block)
                f.flush()
                os.fsync(f.fileno())
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        emit(event="error", exit_code=1, reason=f"cannot write output: {exc.strerror}")
        return 1


def run_flood(inp: Path, out: Path, mib: float) -> int:
    junk = b"flood " * 10922 + b"\n"  # ~64 KiB lines
    junk_no_newline = b"{" * 65536
    total = int(mib * 1024 * 1024)
    written = 0
    while written < total:
        sys.stdout.buffer.write(junk if (written // 65536) % 2 else junk_no_newline)
        written += 65536
    sys.stdout.buffer.write(b"\n")
    sys.stdout.flush()
    return run_ok(inp, out, 0.0)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", type=Path, required=True)
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--tokenizer", required=True)
    args, _ = ap.parse_known_args(argv)
    if not args.tokenizer.startswith("stub:"):
        os.execv(sys.executable, [sys.executable, "-m", "gpuspool.extract", *argv])
    mode, _, arg = args.tokenizer[len("stub:") :].partition(":")
    if mode == "ok":
        return run_ok(args.input, args.output, float(arg or 0.05))
    if mode == "oom":
        emit(event="start", lines_total=1)
        emit(event="error", exit_code=75, reason="CUDA out of memory (simulated)")
        return 75
    if mode == "hang":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        emit(event="start", lines_total=1)
        while True:
            time.sleep(1)
    if mode == "flood":
        return run_flood(args.input, args.output, float(arg or 64))
    if mode == "fill":
        return run_fill(args.output)
    emit(event="error", exit_code=64, reason=f"unknown stub mode {mode!r}")
    return 64


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
