"""The worker's read-ahead of a tokenizer folder is a hint: it never waits and never fails."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from gpuspool.extract.startup import will_need


def test_a_fifo_in_a_weights_files_place_is_not_waited_on(tmp_path: Path) -> None:
    """A FIFO opened for reading blocks until a writer comes: the read-ahead must not."""
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    done = threading.Event()
    threading.Thread(target=lambda: (will_need(fifo), done.set()), daemon=True).start()
    assert done.wait(5), "will_need blocked on a FIFO"


def test_missing_and_unreadable_files_are_skipped(tmp_path: Path) -> None:
    will_need(tmp_path / "absent.json")
    will_need(tmp_path)  # a folder: opened, advice refused or ignored, no error
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0" * 4096)
    will_need(weights)
