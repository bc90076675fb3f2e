"""Hostile entries in ``incoming/`` through the daemon's intake: refused, never followed, never
blocking the others (beyond the single cases of ``tests/unit/test_spool.py``)."""

from __future__ import annotations

import os
import pwd
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from gpuspool import privileges
from gpuspool.daemon import TickReport
from gpuspool.spool import RawJob, Refusal, Spool
from tests.conftest import Harness

ROOT = os.geteuid() == 0


def _intake(h: Harness) -> TickReport:
    """Intake at the next second until every entry is decided (scans waited for)."""
    h.now += 1
    report: TickReport = h.settle_intake(timeout=300.0)
    return report


def _reasons(h: Harness) -> dict[str, str]:
    """file name (as displayed) → reason, from every ``.reason`` file in ``rejected/``."""
    out = {}
    for p in h.daemon.spool.reason_files():
        head, _, reason = p.read_text().partition("\nreason: ")
        out[head.removeprefix("file: ")] = reason.strip()
    return out


def _job(h: Harness, name: str, **extra: Any) -> dict[str, Any]:
    return {"input": str(h.data / "in.jsonl"), "output": str(h.data / f"{name}.out"),
            "tokenizer": "tiny", **extra}  # fmt: skip


def _place(h: Harness, name: str | bytes, content: bytes) -> None:
    h.settings.incoming_dir.mkdir(parents=True, exist_ok=True)
    raw = name.encode() if isinstance(name, str) else name
    with open(os.path.join(bytes(h.settings.incoming_dir), raw), "wb") as f:
        f.write(content)


def _json(data: dict[str, Any]) -> bytes:
    import json

    return json.dumps(data).encode()


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A file only root may read, with job-file content."""
    p = tmp_path / "secret.json"
    p.write_text('{"input": "/etc/hostname", "output": "/tmp/x", "tokenizer": "t"}')
    p.chmod(0o600)
    return p


def test_every_kind_of_link_and_special_file_is_refused_and_not_followed(
    harness: Harness, secret: Path, tmp_path: Path
) -> None:
    """Symlinks (to a root-only file, a folder, nowhere, themselves), a hard link to the root-only
    file, a FIFO, a socket, devices and a folder: each refused with its reason, targets untouched,
    and a valid job among them still accepted, in one intake."""
    inc = harness.settings.incoming_dir
    inc.mkdir(parents=True, exist_ok=True)
    before = secret.read_bytes(), secret.stat().st_mtime_ns
    (inc / "a-link.json").symlink_to(secret)
    (inc / "b-dirlink.json").symlink_to(tmp_path)
    (inc / "c-dangling.json").symlink_to(tmp_path / "nowhere.json")
    (inc / "d-loop.json").symlink_to(inc / "d-loop.json")
    (inc / "e-shadow.toml").symlink_to("/etc/shadow")
    os.link(secret, inc / "f-hardlink.json")
    os.mkfifo(inc / "g-fifo.json")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(inc / "h-socket.json"))
    (inc / "i-dir.json").mkdir()
    (inc / "i-dir.json" / "inner.json").write_bytes(_json(_job(harness, "inner")))
    if ROOT:
        os.mknod(inc / "j-null.json", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        os.mknod(inc / "k-block.json", stat.S_IFBLK | 0o600, os.makedev(7, 0))
    harness.submit("z-valid")
    t0 = time.monotonic()
    report = _intake(harness)
    sock.close()
    assert time.monotonic() - t0 < 5
    assert len(report.accepted) == 1 and harness.daemon.spool.pending() == []
    reasons = _reasons(harness)
    expect = {
        "a-link.json": "symbolic link",
        "b-dirlink.json": "symbolic link",
        "c-dangling.json": "symbolic link",
        "d-loop.json": "symbolic link",
        "e-shadow.toml": "symbolic link",
        "f-hardlink.json": "2 hard links",
        "g-fifo.json": "a FIFO",
        # open() of a socket fails with ENXIO before it can be fstat'ed: refused either way
        "h-socket.json": "not a regular file (a socket)",
        "i-dir.json": "a directory",
    }
    if ROOT:
        expect |= {"j-null.json": "a character device", "k-block.json": "a block device"}
    for name, why in expect.items():
        assert why in reasons.get(name, ""), (name, reasons.get(name))
    assert (secret.read_bytes(), secret.stat().st_mtime_ns) == before
    assert secret.stat().st_nlink == 2  # the hard link was moved to rejected/, not followed
    assert len(harness.daemon.ledger.jobs()) == 1


def test_file_growing_while_read_is_refused(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file appended to between the daemon's stat and its read is refused as changed."""
    name = "grows.json"
    _place(harness, name, _json(_job(harness, "g")))
    path = harness.settings.incoming_dir / name
    real_read = os.read
    calls = []

    def read_and_grow(fd: int, n: int) -> bytes:
        if not calls:
            with open(path, "ab") as f:
                f.write(b"   ")
        calls.append(n)
        return real_read(fd, n)

    monkeypatch.setattr("gpuspool.spool.os.read", read_and_grow)
    report = _intake(harness)
    monkeypatch.undo()
    assert report.accepted == []
    assert "changed while being read" in _reasons(harness)[name]


def test_file_rewritten_during_reads_is_never_taken_torn(tmp_path: Path) -> None:
    """A writer rewrites a file in place (two different jobs, different lengths) while it is read
    500 times: every read is refused or is exactly one of the two complete versions."""
    spool = Spool(tmp_path / "spool")
    spool.ensure_dirs()
    path = spool.incoming / "flip.json"
    small = {"input": "/a", "output": "/b", "tokenizer": "t"}
    large = {"input": "/a", "output": "/b", "tokenizer": "t" * 3000, "name": "v2"}
    versions = [_json(small), _json(large)]
    path.write_bytes(versions[0])
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            with open(path, "r+b") as f:
                f.truncate(0)
                f.write(versions[i % 2])
            i += 1

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    seen = {"raw": 0, "refused": 0}
    try:
        for _ in range(500):
            got = spool.read(b"flip.json")
            if isinstance(got, RawJob):
                seen["raw"] += 1
                assert got.data in (small, large)
            else:
                assert isinstance(got, Refusal)
                seen["refused"] += 1
    finally:
        stop.set()
        t.join()
    assert seen["raw"] + seen["refused"] == 500


def test_odd_names_are_accepted_or_refused_with_one_line_reasons(harness: Harness) -> None:
    """Names with newlines, non-UTF-8 bytes, control characters and leading dashes: valid jobs are
    accepted, the rest refused; every reason file's "file:" line is one escaped line."""
    names = [b"new\nline.json", b"bad\xff\xfebytes.json", b"ctl\x1b[31m.json", b"-rf.json",
             b"sp ace.toml", b"\xe2\x80\xaertl.json", b"tab\t.json"]  # fmt: skip
    for i, n in enumerate(names):
        if n.endswith(b".toml"):
            content = (
                f'input = "{harness.data / "in.jsonl"}"\noutput = "{harness.data / f"o{i}"}"\n'
                'tokenizer = "tiny"\n'
            ).encode()
        else:
            content = _json(_job(harness, f"o{i}"))
        _place(harness, n, content)
    _place(harness, b"broken\n\xff.json", b"{nope")
    report = _intake(harness)
    assert len(report.accepted) == len(names)
    assert harness.daemon.spool.pending() == []
    reason_files = harness.daemon.spool.reason_files()
    assert len(reason_files) == 1
    text = reason_files[0].read_text()
    assert text.count("\n") == 3 and text.startswith("file: broken\\n")


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("input", "/data/../etc/shadow", "must not contain '..'"),
        ("output", "/tmp/../etc/cron.d/x", "must not contain '..'"),
        ("output", "relative/out.jsonl", "must be absolute"),
        ("input", "in.jsonl", "must be absolute"),
        ("output", "/etc/passwd", "already exists"),
        ("output", "/nonexistent-dir/out.jsonl", "does not exist"),
        ("input", "/etc", "not a file"),
    ],
)
def test_path_traversal_and_bad_paths_are_refused(
    harness: Harness, field: str, value: str, why: str
) -> None:
    """``..``, relative paths, existing outputs and missing folders in input/output: refused."""
    harness.drop_raw("p.json", _json({**_job(harness, "p"), field: value}))
    report = _intake(harness)
    assert report.accepted == []
    assert why in _reasons(harness)["p.json"]


@pytest.mark.skipif(not ROOT, reason="needs root to own a job file as another user")
def test_submitter_cannot_reach_what_only_the_daemon_can_read(
    harness: Harness, open_dir: Path
) -> None:
    """A job of user nobody naming a root-only input, directly or through a symlink, or an output
    in a root-only folder, is refused: paths are checked as the submitter, not as the daemon."""
    nobody = pwd.getpwnam("nobody").pw_uid
    tmp_path = open_dir
    harness.daemon.identity_for = lambda uid: privileges.job_identity(
        uid, daemon_euid=0, fallback_user=None
    )
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "in.jsonl").write_text('{"audio": "a.wav"}\n')
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    (shared / "link.jsonl").symlink_to(private / "in.jsonl")
    readable = shared / "in.jsonl"
    readable.write_text('{"audio": "a.wav"}\n')
    readable.chmod(0o644)
    cases = {
        "direct.json": {"input": str(private / "in.jsonl"), "output": str(shared / "o1")},
        "via-link.json": {"input": str(shared / "link.jsonl"), "output": str(shared / "o2")},
        "shadow.json": {"input": "/etc/shadow", "output": str(shared / "o3")},
        "out-private.json": {"input": str(readable), "output": str(private / "o4")},
        "ok.json": {"input": str(readable), "output": str(shared / "o5")},
    }
    for name, paths in cases.items():
        dest = harness.drop_raw(name, _json({**paths, "tokenizer": "tiny"}))
        os.chown(dest, nobody, nobody)
    report = _intake(harness)
    reasons = _reasons(harness)
    assert set(reasons) == set(cases) - {"ok.json"}, reasons
    assert len(report.accepted) == 1
    assert harness.daemon.ledger.jobs()[0].submitter_uid == nobody


def test_flood_of_10000_entries_is_decided_in_one_pass(ram_dir: Path) -> None:
    """10,000 entries (valid jobs, bad JSON, links, FIFOs, oversized, wrong suffix) in one
    intake: every one decided, none left, nothing blocks; the valid ones are all accepted."""
    h = Harness(ram_dir)
    inc = h.settings.incoming_dir
    inc.mkdir(parents=True, exist_ok=True)
    valid = 0
    for i in range(10_000):
        kind = i % 8
        name = f"{i:05d}"
        if kind == 0:
            (inc / f"{name}.json").write_bytes(_json(_job(h, f"v{i}")))
            valid += 1
        elif kind == 1:
            (inc / f"{name}.json").write_bytes(b"{broken")
        elif kind == 2:
            (inc / f"{name}.json").symlink_to("/etc/hostname")
        elif kind == 3:
            os.mkfifo(inc / f"{name}.json")
        elif kind == 4:
            (inc / f"{name}.json").write_bytes(b" " * 70_000)
        elif kind == 5:
            (inc / f"{name}.yaml").write_bytes(b"a: 1")
        elif kind == 6:
            (inc / f"{name}.toml").write_bytes(b"input = 3\n")
        else:
            (inc / f"{name}.json").write_bytes(_json({**_job(h, f"x{i}"), "input": "/a/../b"}))
    t0 = time.monotonic()
    report = _intake(h)
    elapsed = time.monotonic() - t0
    print(f"10,000 entries decided in {elapsed:.1f} s")
    assert len(report.accepted) == valid
    assert len(report.rejected) == 10_000 - valid
    assert h.daemon.spool.pending() == []
    assert len(h.daemon.spool.reason_files()) == 10_000 - valid
    assert len(h.daemon.ledger.jobs()) == valid
