"""A job's scratch folder: private to it, reachable under the daemon's umask, never a link."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gpuspool.runner import make_scratch, remove_scratch
from tests.conftest import wait_until


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_scratch_folder_is_private_and_its_parent_reachable(tmp_path: Path) -> None:
    job = tmp_path / "scratch" / "job1"
    old = os.umask(0o077)  # the unit's UMask
    try:
        make_scratch(job, None)
    finally:
        os.umask(old)
    assert _mode(job.parent) == 0o711 and _mode(job) == 0o700
    (job / "cache").mkdir()
    make_scratch(job, None)  # a retry keeps what the job cached
    assert (job / "cache").is_dir()
    remove_scratch(job)
    assert not job.exists() and job.parent.is_dir()
    remove_scratch(job)  # nothing there: nothing to do


def test_a_link_at_the_scratch_path_is_replaced_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep").write_text("x")
    job = tmp_path / "scratch" / "job1"
    job.parent.mkdir(mode=0o711)
    job.symlink_to(target)
    make_scratch(job, None)
    assert job.is_dir() and not job.is_symlink() and (target / "keep").exists()


def test_a_scratch_parent_others_may_write_is_refused(tmp_path: Path) -> None:
    parent = tmp_path / "scratch"
    parent.mkdir()
    parent.chmod(0o777)
    with pytest.raises(RuntimeError, match="writable by nobody else"):
        make_scratch(parent / "job1", None)


def test_a_tree_deeper_than_recursion_goes_is_removed_without_waiting(tmp_path: Path) -> None:
    """A job's user may leave any tree in their folder: it is renamed aside at once and removed
    by a child process, however deep."""
    job = tmp_path / "scratch" / "job1"
    make_scratch(job, None)
    fd = os.open(job, os.O_RDONLY)
    for _ in range(3000):
        os.mkdir("d", dir_fd=fd)
        inner = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = inner
    os.close(fd)
    remove_scratch(job)
    assert not job.exists()
    wait_until(lambda: not os.listdir(job.parent), timeout=30)


@pytest.mark.skipif(os.geteuid() != 0, reason="planting another user's folder needs root")
def test_a_parent_another_user_planted_in_a_shared_folder_is_moved_aside(tmp_path: Path) -> None:
    """In a sticky world-writable folder (``/var/tmp``), a parent someone else made first is
    renamed aside and made anew; the shared folder itself is never moved."""
    shared = tmp_path / "vartmp"
    shared.mkdir()
    shared.chmod(0o1777)
    planted = shared / "gpuspool"
    planted.mkdir(mode=0o777)
    os.chown(planted, 65534, 65534)
    make_scratch(planted / "job1", None)
    assert planted.stat().st_uid == os.geteuid() and _mode(planted) == 0o711
    assert [p.name.startswith("gpuspool.not-ours-") for p in shared.iterdir()].count(True) == 1
    with pytest.raises(RuntimeError, match="writable by nobody else"):
        make_scratch(shared / "job2", None)  # scratch_dir = the shared folder: refused, kept
    assert shared.is_dir() and _mode(shared) == 0o1777
