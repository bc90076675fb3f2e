"""Start-up helpers of the extraction worker that need neither torch nor qwen-tts.

The worker's start-up is the imports, the model load and the device's own start (CUDA context,
cuDNN and cuBLAS). What does not depend on the imports runs beside them: the kernel reads the
tokenizer's weights into the page cache while Python imports (:func:`prefetch_tokenizer`).
:func:`process_age_s` measures start-up from the process's exec, as the kernel recorded it, so
the interpreter's own start and the imports before ``Run`` are counted too.

A worker the daemon starts before its GPU is free (``prestart``) does its imports and loads the
tokenizer, then waits at the gate (:func:`read_go`) for the line naming its GPU; CUDA has not
started by then, so the ``CUDA_VISIBLE_DEVICES`` that line sets is the one CUDA reads
(:func:`cuda_sees_no_gpu` tells when something started it earlier).
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from pathlib import Path

from gpuspool.protocol import MAX_GO_BYTES, parse_go

#: Files of a tokenizer folder that the load reads: the weights and the configs.
_TOKENIZER_FILES = ("*.safetensors", "*.bin", "*.json")


def prefetch_tokenizer(tokenizer: str) -> None:
    """If ``tokenizer`` is a local folder, have the kernel read its weights and configs into the
    page cache in the background (``POSIX_FADV_WILLNEED``), while the imports run, from a
    daemon thread nothing waits for. A hub id (no such folder) is left to the hub's own cache,
    and a file that cannot be opened is skipped: the load reports it.
    """
    folder = Path(tokenizer)
    if not hasattr(os, "posix_fadvise") or not folder.is_dir():
        return
    threading.Thread(
        target=_advise_will_need, args=(folder,), name="prefetch-tokenizer", daemon=True
    ).start()


def _advise_will_need(folder: Path) -> None:
    """Ask for read-ahead of each of the folder's tokenizer files, largest last."""
    files = sorted(
        {p for pattern in _TOKENIZER_FILES for p in folder.glob(pattern) if p.is_file()},
        key=lambda p: p.stat().st_size,
    )
    for path in files:
        will_need(path)


def will_need(path: Path) -> None:
    """Ask the kernel to read ``path`` into the page cache (``POSIX_FADV_WILLNEED``); a file
    that cannot be opened is skipped: read-ahead is a hint, never an error. Opened without
    blocking: a FIFO put in the file's place after the folder was listed is not waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def process_age_s() -> float | None:
    """Seconds since this process started, from the kernel's record (``/proc/self/stat``, in
    clock ticks since boot, against ``CLOCK_BOOTTIME``); None where that is not available."""
    try:
        stat = Path("/proc/self/stat").read_text()
        # Field 22, counted after the command name, which is in parentheses and may hold spaces.
        start_ticks = int(stat.rpartition(")")[2].split()[19])
        ticks = os.sysconf("SC_CLK_TCK")
        now = time.clock_gettime(time.CLOCK_BOOTTIME)
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return max(0.0, now - start_ticks / ticks)


def read_go(fd: int) -> dict[str, str] | None:
    """Wait for the daemon's go line on ``fd`` (the gate) and close it; the variables it sets,
    or None when the gate closed first (the daemon does not want this run) or the line is not a
    go line."""
    data = b""
    try:
        while b"\n" not in data and len(data) <= MAX_GO_BYTES:
            chunk = os.read(fd, MAX_GO_BYTES + 1)
            if not chunk:
                return None
            data += chunk
    finally:
        os.close(fd)
    line, newline, _ = data.partition(b"\n")
    return parse_go(line) if newline else None


def cuda_sees_no_gpu() -> bool:
    """Whether the CUDA driver, already in this process, sees no GPU: it read
    ``CUDA_VISIBLE_DEVICES`` when it started (``cuInit``), never again, and an earlier start
    under an empty value (or a failed one, which it keeps answering) leaves it without any.
    False where the driver library is not loaded: it starts later, with the environment as it
    is then (this check never loads it). Where it is loaded but not started, this starts it,
    with the environment as it is now."""
    try:
        lib = ctypes.CDLL("libcuda.so.1", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except OSError:
        return False
    count = ctypes.c_int()
    if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return True
    return count.value == 0
