"""The service's start-up guards and the spool's housekeeping, on real files and SQLite."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from gpuspool.ledger import Ledger, LedgerUnusable
from gpuspool.service import LOCK_NAME, StartupError, lock_state_dir
from gpuspool.spool import Spool

PAGE = 4096


def _ledger_with_rows(path: Path, n: int = 400) -> None:
    ledger = Ledger(path)
    for i in range(n):
        ledger.set_meta(f"key-{i}", "x" * 200)
    ledger.close()


def test_open_checked_creates_a_missing_ledger_private(tmp_path: Path) -> None:
    path = tmp_path / "state" / "ledger.sqlite3"
    ledger = Ledger.open_checked(path)
    assert ledger.counts() == {}
    ledger.close()
    assert path.stat().st_mode & 0o777 == 0o600


def test_open_checked_refuses_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    path.write_bytes(b"garbage" * 1000)
    with pytest.raises(LedgerUnusable, match=r"cannot open the ledger .*ledger\.sqlite3"):
        Ledger.open_checked(path)


def test_open_checked_refuses_damaged_pages(tmp_path: Path) -> None:
    """A ledger whose pages were overwritten fails ``quick_check``: one line, names the file."""
    path = tmp_path / "ledger.sqlite3"
    _ledger_with_rows(path)
    assert path.stat().st_size > 8 * PAGE
    with open(path, "r+b") as f:
        f.seek(2 * PAGE)
        f.write(b"\xff" * (4 * PAGE))
    with pytest.raises(LedgerUnusable) as info:
        Ledger.open_checked(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_open_checked_passes_a_sound_ledger(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    _ledger_with_rows(path, 50)
    Ledger.open_checked(path).close()


def test_state_dir_lock_is_exclusive_and_names_the_holder(tmp_path: Path) -> None:
    """flock locks belong to an open file: a second take fails naming the pid written first;
    closing the first releases it."""
    fd = lock_state_dir(tmp_path / "state")
    assert (tmp_path / "state" / LOCK_NAME).read_text().strip() == str(os.getpid())
    with pytest.raises(StartupError, match=rf"another gpuspool daemon \(pid {os.getpid()}\)"):
        lock_state_dir(tmp_path / "state")
    os.close(fd)
    os.close(lock_state_dir(tmp_path / "state"))


def test_prune_rejected_removes_only_old_entries(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.ensure_dirs()
    now = time.time()
    for name, age_days in (("old", 8), ("old.reason", 8), ("new", 1), ("new.reason", 1)):
        p = spool.rejected / name
        p.write_text("x")
        os.utime(p, (now - age_days * 86400, now - age_days * 86400))
    (spool.rejected / "a-folder").mkdir()
    os.utime(spool.rejected / "a-folder", (0, 0))
    (spool.rejected / "link").symlink_to(tmp_path / "elsewhere")
    os.utime(spool.rejected / "link", (0, 0), follow_symlinks=False)
    assert spool.prune_rejected(now - 7 * 86400) == 3
    assert sorted(os.listdir(spool.rejected)) == ["a-folder", "new", "new.reason"]


def test_submit_leaves_nothing_in_tmp_when_publishing_fails(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.ensure_dirs()
    spool.incoming.rmdir()  # the rename into incoming/ fails
    with pytest.raises(OSError):
        spool.submit({"input": "/x"}, stem="j")
    assert os.listdir(spool.staging) == []
