"""Start-up helpers of the extraction worker that need neither torch nor qwen-tts.

The worker's start-up is the imports, the model load and the device's own start (CUDA context,
cuDNN and cuBLAS). What does not depend on the imports runs beside them: the kernel reads the
tokenizer's weights into the page cache while Python imports (:func:`prefetch_tokenizer`).
:func:`process_age_s` measures start-up from the process's exec, as the kernel recorded it, so
the interpreter's own start and the imports before ``Run`` are counted too.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

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
