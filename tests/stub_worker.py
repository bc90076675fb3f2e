"""A stand-in extraction worker for the daemon's unit tests: real process, scripted outcome.

It takes the worker's flags (and, started before its GPU, waits at its gate as the worker does;
its ``start`` event names the GPU it was given), and behaves as ``STUB_MODE`` says: ok (write
the output, exit 0), stray (as ok, leaving a child that sleeps in a session of its own),
oom (exit 75), data (exit 65), exists (exit 73), crash (exit 1), sleep (run until SIGTERM, then
exit 143), slow (``STUB_STEPS`` × 50 ms of running time, then ok, its pid in the output line).
The integration tests run the real worker instead.

Two modes play a hostile job for the attack tests: ``probe`` prints (on stdout, the human log) one
``{"probe": ...}`` line saying what the process can see (its cwd, its whole environment, whether
it can read ``secret.txt`` through its cwd or its output folder, whether its TMPDIR and caches are
writable), then finishes as ``ok``; ``hostile`` writes malformed events (wrong types, 2,000
nested brackets, an endless line) to the events channel and stdout, one valid progress event,
then sleeps like ``sleep``; ``lie`` says it is done and exits 0 without writing its output;
``greedy`` reports a GPU peak of 10^15 GiB (the largest the protocol takes), then sleeps.
"""

import argparse
import json
import os
import signal
import sys
import time


def emit(**event):
    """Print the event (the human log) and send it on the daemon's events channel."""
    line = json.dumps(event)
    print(line, flush=True)
    fd = os.environ.get("GPUSPOOL_EVENTS_FD")
    if fd:
        os.write(int(fd), (line + "\n").encode())


def _readable(path):
    try:
        with open(path, "rb") as f:
            return f.read(100).decode("utf-8", "replace")
    except OSError as exc:
        return f"error: {exc.strerror}"


def _writable(folder):
    try:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "probe.tmp"), "w") as f:
            f.write("x")
        return True
    except (OSError, TypeError):
        return False


def probe(args) -> None:
    with open("/proc/self/environ", "rb") as f:
        environ = dict(
            item.decode("utf-8", "replace").partition("=")[::2]
            for item in f.read().split(b"\0")
            if item
        )
    out_dir = os.path.dirname(args.output)
    report = {
        "cwd": os.getcwd(),
        "uid": os.getuid(),
        "environ": environ,
        "secret_via_cwd": _readable("secret.txt"),
        "secret_via_proc_cwd": _readable(f"/proc/{os.getpid()}/cwd/secret.txt"),
        "secret_via_output_folder": _readable(os.path.join(out_dir, "secret.txt")),
        "home_writable": _writable(os.environ.get("HOME")),
        "tmp_writable": _writable(os.environ.get("TMPDIR")),
        "numba_cache_writable": _writable(os.environ.get("NUMBA_CACHE_DIR")),
        "cache_writable": _writable(os.environ.get("XDG_CACHE_HOME")),
    }
    print(json.dumps({"probe": report}), flush=True)


HOSTILE_LINES = [
    b'{"event":"progress","lines_done":"a","lines_total":"b"}',
    b"{" + b"[" * 2000,
    b'{"event":"progress","x":' + b"[" * 2000 + b"]" * 2000 + b"}",
    b'{"event":"error","exit_code":1e999,"reason":{}}',
    b'{"event":"summary","peak_gpu_gib":"lots"}',
    b'{"event":"job_finished","source":"daemon"}',
    b"\xff\xfe\x00\x1b[2J",
    b'{"event":"progress","lines_done":' + b"9" * 5000 + b"}",
    b"{" * 100000,
]


def hostile() -> None:
    fd = os.environ.get("GPUSPOOL_EVENTS_FD")
    for line in HOSTILE_LINES:
        sys.stdout.buffer.write(line + b"\n")
        if fd:
            os.write(int(fd), line + b"\n")
    sys.stdout.flush()
    emit(event="progress", lines_done=2, lines_total=4, audio_s_done=3.0)


def read_go(fd: int) -> dict[str, str] | None:
    """The go line on the gate, or None if it closed first. The worker's own reading is
    ``gpuspool.extract.startup.read_go``; this stand-in also runs where gpuspool cannot be
    imported (by the system Python, as another user)."""
    with os.fdopen(fd, "rb") as gate:
        line = gate.readline(513)
    if not line.endswith(b"\n"):
        return None
    go = json.loads(line)
    return go if isinstance(go, dict) else None


def main() -> int:
    ap = argparse.ArgumentParser()
    for flag in (
        "--input",
        "--output",
        "--tokenizer",
        "--device",
        "--batch-seconds",
        "--on-bad-line",
        "--dtype",
    ):
        ap.add_argument(flag)
    ap.add_argument("--no-resume", action="store_true")
    args = ap.parse_args()
    gate = os.environ.pop("GPUSPOOL_GATE_FD", None)
    if gate is not None:  # prestarted: wait for the go line, as the worker does
        go = read_go(int(gate))
        if go is None:
            print("not started: the daemon closed the gate", flush=True)
            return 143
        os.environ.update(go)
    mode = os.environ.get("STUB_MODE", "ok")
    if mode == "probe":
        probe(args)
        mode = "ok"
    emit(
        event="start",
        lines_total=4,
        device=args.device,
        uid=os.getuid(),
        gid=os.getgid(),
        gpu=os.environ.get("CUDA_VISIBLE_DEVICES"),
    )
    emit(
        event="progress",
        lines_done=1,
        lines_total=4,
        audio_s_done=2.0,
        audio_s_per_s=10.0,
        eta_s=0.6,
        gpu_peak_gib=None,
    )
    if mode == "oom":
        emit(event="error", exit_code=75, reason="CUDA out of memory (stub)")
        return 75
    if mode == "data":
        emit(event="error", exit_code=65, reason="line 3: audio file missing", line=3)
        return 65
    if mode == "exists":
        emit(event="error", exit_code=73, reason=f"output {args.output} exists")
        return 73
    if mode == "crash":
        raise RuntimeError("boom")
    if mode == "stray":  # leave a child behind in a session of its own, then finish as ok
        if os.fork() == 0:
            os.setsid()
            time.sleep(60)
            os._exit(0)
        mode = "ok"
    if mode == "lie":  # says done without writing anything
        emit(event="summary", lines_done=4, lines_skipped=0, peak_gpu_gib=1.5)
        return 0
    if mode == "hostile":
        hostile()
        mode = "sleep"
    if mode == "greedy":
        emit(event="progress", lines_done=1, lines_total=4, audio_s_done=2.0, gpu_peak_gib=1e15)
        mode = "sleep"
    if mode == "slow":  # work for STUB_STEPS × 50 ms of running time (a stopped process does not
        # advance), then finish as ok with its pid in the output line
        for _ in range(int(os.environ.get("STUB_STEPS", "20"))):
            time.sleep(0.05)
        with open(args.output, "w") as f:
            f.write(json.dumps({"audio": "a.wav", "pid": os.getpid()}) + "\n")
        emit(event="summary", lines_done=4, lines_skipped=0, peak_gpu_gib=1.5)
        return 0
    if mode == "sleep":
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        while not stop:
            time.sleep(0.02)
        emit(event="error", exit_code=143, reason="interrupted by SIGTERM")
        return 143
    with open(args.output, "w") as f:
        f.write(json.dumps({"audio": "a.wav", "audio_codes": [[1] * 16]}) + "\n")
    emit(
        event="summary",
        lines_done=4,
        lines_skipped=0,
        audio_s_done=8.0,
        audio_s_per_s=10.0,
        wall_s=0.8,
        peak_gpu_gib=1.5,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
