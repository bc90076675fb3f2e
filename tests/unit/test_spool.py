"""The spool refuses what is not a plain job file, without following or blocking on it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gpuspool.spool import RawJob, Refusal, Spool, display_name


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "spool", max_bytes=1024)
    s.ensure_dirs()
    return s


def read(spool: Spool, name: str | bytes) -> RawJob | Refusal:
    return spool.read(name.encode() if isinstance(name, str) else name)


def test_symlink_is_refused_not_followed(spool: Spool, tmp_path: Path) -> None:
    """A link to a readable file is refused as a link; its target is never read."""
    secret = tmp_path / "secret.json"
    secret.write_text('{"input": "/x"}')
    (spool.incoming / "link.json").symlink_to(secret)
    result = read(spool, "link.json")
    assert isinstance(result, Refusal) and "symbolic link" in result.reason
    spool.reject(b"link.json", result.reason)
    assert secret.exists() and not (spool.incoming / "link.json").exists()
    moved = [p for p in spool.rejected.iterdir() if not p.name.endswith(".reason")]
    assert len(moved) == 1 and moved[0].is_symlink()


def test_hard_link_is_refused(spool: Spool, tmp_path: Path) -> None:
    """A file with a second hard link (maybe someone else's file) is refused."""
    other = spool.root / "other.json"
    other.write_text("{}")
    os.link(other, spool.incoming / "hl.json")
    result = read(spool, "hl.json")
    assert isinstance(result, Refusal) and "2 hard links" in result.reason


def test_fifo_does_not_block(spool: Spool) -> None:
    """A FIFO is refused at once (opening it must not wait for a writer)."""
    os.mkfifo(spool.incoming / "pipe.json")
    result = read(spool, "pipe.json")
    assert isinstance(result, Refusal) and "FIFO" in result.reason


def test_directory_and_device_are_refused(spool: Spool) -> None:
    """Directories and device nodes are not job files."""
    (spool.incoming / "dir.json").mkdir()
    result = read(spool, "dir.json")
    assert isinstance(result, Refusal) and "directory" in result.reason
    if os.geteuid() == 0:
        os.mknod(spool.incoming / "null.json", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        result = read(spool, "null.json")
        assert isinstance(result, Refusal) and "character device" in result.reason


def test_oversized_file_is_refused(spool: Spool) -> None:
    """A file above the size cap is refused before it is parsed."""
    (spool.incoming / "big.json").write_text("{" + " " * 2000 + "}")
    result = read(spool, "big.json")
    assert isinstance(result, Refusal) and "too large" in result.reason


def test_wrong_suffix_and_bad_content(spool: Spool) -> None:
    """Only .toml/.json; content must be UTF-8 and a table."""
    (spool.incoming / "job.yaml").write_text("a: 1")
    (spool.incoming / "list.json").write_text("[1, 2]")
    (spool.incoming / "deep.json").write_text("[" * 900 + "]" * 900)
    assert "must end in .toml or .json" in read(spool, "job.yaml").reason  # type: ignore[union-attr]
    assert "top level must be" in read(spool, "list.json").reason  # type: ignore[union-attr]
    deep = read(spool, "deep.json")
    assert isinstance(deep, Refusal)


def test_odd_names_are_handled(spool: Spool) -> None:
    """Names with newlines or non-UTF-8 bytes are read and shown escaped."""
    name = b"we\nird\xff.json"
    with open(os.path.join(bytes(spool.incoming), name), "w") as f:
        f.write('{"input": "/a"}')
    assert name in spool.pending()
    result = spool.read(name)
    assert isinstance(result, RawJob) and result.data == {"input": "/a"}
    assert "\n" not in display_name(name)
    spool.reject(name, "test")
    assert spool.pending() == []


def test_dotfiles_are_ignored(spool: Spool) -> None:
    """Names starting with a dot are in-progress writes and are left alone."""
    (spool.incoming / ".partial.json").write_text("{")
    assert spool.pending() == []


def test_job_id_is_stable_for_the_same_file(spool: Spool) -> None:
    """Reading the same file twice gives the same id (a rescan after a crash adds nothing)."""
    (spool.incoming / "a.json").write_text('{"x": 1}')
    first, second = read(spool, "a.json"), read(spool, "a.json")
    assert isinstance(first, RawJob) and isinstance(second, RawJob)
    assert first.job_id == second.job_id


def test_socket_is_refused_as_a_socket(spool: Spool) -> None:
    """A UNIX socket in incoming/ is named as such (it cannot even be opened)."""
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(spool.incoming / "s.json"))
        result = read(spool, "s.json")
        assert isinstance(result, Refusal) and result.reason == "not a regular file (a socket)"
    finally:
        sock.close()
