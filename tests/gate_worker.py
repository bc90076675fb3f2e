"""A stand-in worker that misbehaves at its gate (``prestart``), for the daemon's attack tests.

Started without a gate, or with ``GATE_MODE`` unset, it is the stub worker (tests/stub_worker.py).
Started with one, it does what ``GATE_MODE`` says before the daemon's go line could reach it:

- ``close``: closes its end of the gate, then sleeps (the go line finds no reader);
- ``fill``: opens a write end of its own gate through /proc and fills the pipe, then sleeps
  (the go line finds no room);
- ``ignore``: never reads its gate (sleeps);
- ``stop``: stops itself (SIGSTOP) at its gate;
- ``holder``: forks a child that leaves for a session of its own keeping the gate open, then
  exits 3 at once (the go line finds a reader, but not the process the daemon started);
- ``slow``: sleeps ``GATE_SLEEP`` seconds (default 3) as a long import does, then waits at its
  gate as the worker does.
"""

from __future__ import annotations

import os
import signal
import sys
import time

STUB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stub_worker.py")


def stub() -> None:
    os.execv(sys.executable, [sys.executable, STUB, *sys.argv[1:]])


def main() -> None:
    mode = os.environ.get("GATE_MODE", "")
    gate = os.environ.get("GPUSPOOL_GATE_FD")
    if gate is None or not mode:
        stub()
    fd = int(gate or -1)
    if mode == "close":
        os.close(fd)
    elif mode == "fill":
        w = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK)
        try:
            while True:
                os.write(w, b"x" * 4096)
        except BlockingIOError:
            pass
    elif mode == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif mode == "holder":
        if os.fork() == 0:
            os.setsid()
            time.sleep(600)
            os._exit(0)
        os._exit(3)
    elif mode == "slow":
        time.sleep(float(os.environ.get("GATE_SLEEP", "3")))
        stub()
    time.sleep(600)


if __name__ == "__main__":
    main()
