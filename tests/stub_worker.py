"""A stand-in extraction worker for the daemon's unit tests: real process, scripted outcome.

It takes the worker's flags, and behaves as ``STUB_MODE`` says: ok (write the output, exit 0),
oom (exit 75), data (exit 65), exists (exit 73), crash (exit 1), sleep (run until SIGTERM, then
exit 143). The integration tests run the real worker instead.
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
    args = ap.parse_args()
    mode = os.environ.get("STUB_MODE", "ok")
    emit(event="start", lines_total=4, device=args.device, uid=os.getuid(), gid=os.getgid())
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
