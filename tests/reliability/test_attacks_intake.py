"""Issue 10's intake rows, each reproduced against the real daemon (its ``tick``, real scanner
processes, real users and spool modes) and shown fixed: rows 3, 5, 6, 7, 8, 10, 11 and 15.

The root daemon reads only the job file; whatever the job names is read by a scanner running as
the job's user. No tick waits on a scan, so these tests tick with ``settle_intake=False`` and
time each tick.
"""

from __future__ import annotations

import json
import os
import pwd
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpuspool import privileges
from gpuspool.daemon import TickReport
from gpuspool.estimate import need_gib
from tests.conftest import Harness, gpu_entry
from tests.integration.conftest import ensure_test_user

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="real users and mounts need root"),
]

#: A tick must stay well under a poll interval whatever a submitter did (2 cores, shared).
TICK_LIMIT_S = 2.0


class Recorder:
    """A stand-in for the daemon's structlog logger that keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def _log(self, level: str) -> Any:
        def log(event: str, **fields: Any) -> None:
            self.lines.append((level, event, fields))

        return log

    def __getattr__(self, level: str) -> Any:
        return self._log(level)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [f for _, e, f in self.lines if e == name]


@pytest.fixture(scope="module")
def user() -> pwd.struct_passwd:
    return ensure_test_user()


@pytest.fixture
def world(user: pwd.struct_passwd) -> Iterator[Harness]:
    """A root daemon whose jobs run as their file's owner; its files where any user can reach."""
    top = Path(tempfile.mkdtemp(prefix="gpuspool-attack-"))
    top.chmod(0o755)
    h = _harness(top)
    yield h
    h.daemon.intake_stage.close()
    shutil.rmtree(top, ignore_errors=True)


def _harness(top: Path, **overrides: Any) -> Harness:
    def identity_for(uid: int) -> privileges.Identity:
        return privileges.job_identity(uid, daemon_euid=0, fallback_user=None)

    h = Harness(top, identity_for=identity_for, **overrides)
    h.data.chmod(0o755)
    (h.data / "in.jsonl").chmod(0o644)
    h.set_gpus([gpu_entry(0, 0)])  # jobs wait: what is tested here is intake
    h.daemon.log = Recorder()
    return h


def _user_dir(h: Harness, user: pwd.struct_passwd, name: str = "u") -> Path:
    d = h.tmp / name
    d.mkdir(exist_ok=True)
    os.chown(d, user.pw_uid, user.pw_gid)
    return d


def _drop(h: Harness, name: str, body: dict[str, Any], owner: int, mode: int = 0o644) -> Path:
    path = h.drop_raw(name, json.dumps({"tokenizer": "tiny", **body}).encode())
    os.chown(path, owner, pwd.getpwuid(owner).pw_gid)
    path.chmod(mode)
    return path


def _reason(h: Harness, name: str) -> str:
    for p in h.daemon.spool.reason_files():
        head, _, reason = p.read_text().partition("\nreason: ")
        if head.removeprefix("file: ") == name:
            return reason.partition("\njob: ")[0].strip()  # the reason, without the job id line
    raise AssertionError(f"no reason file for {name}")


def _tick_until_decided(h: Harness, names: set[str], ticks: int = 200) -> TickReport:
    """Tick (scans not waited for) until each file is accepted or rejected; every tick timed."""
    total = TickReport()
    for _ in range(ticks):
        t0 = time.monotonic()
        report = h.tick(settle_intake=False)
        took = time.monotonic() - t0
        assert took < TICK_LIMIT_S, f"a tick took {took:.1f} s"
        total.accepted += report.accepted
        total.rejected += report.rejected
        left = {n for n in names if (h.settings.incoming_dir / n).exists()}
        if not left and not h.daemon.intake_stage.scanning:
            return total
        time.sleep(0.05)
    raise AssertionError(f"not decided after {ticks} ticks: {left}")


def _wav(path: Path, seconds: float, rate: int = 8000) -> Path:
    import numpy as np
    import soundfile as sf

    sf.write(path, np.zeros(int(seconds * rate), dtype="int16"), rate, subtype="PCM_16")
    return path


def _lying_flac(path: Path, hours: float) -> Path:
    """A 99-byte FLAC whose STREAMINFO claims ``hours`` of audio at 24 kHz."""
    import numpy as np
    import soundfile as sf

    sf.write(path, np.zeros(2400, dtype="int16"), 24000, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    field = int.from_bytes(data[18:26], "big")
    field = (field & ~((1 << 36) - 1)) | int(hours * 3600 * 24000)
    data[18:26] = field.to_bytes(8, "big")
    path.write_bytes(bytes(data))
    return path


def _lying_wav(path: Path, hours: float) -> Path:
    """A 4 KB WAV whose header (RIFF and data sizes) claims ``hours`` of 24 kHz float audio."""
    claimed = int(hours * 3600 * 24000) * 4
    header = b"RIFF" + struct.pack("<I", min(claimed + 36, 2**32 - 1)) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 3, 1, 24000, 96000, 4, 32)
    header += b"data" + struct.pack("<I", min(claimed, 2**32 - 1))
    path.write_bytes(header + bytes(4096 - len(header)))
    return path


# -- row 3 -----------------------------------------------------------------------------------------


def test_row3_fifo_in_the_input_never_blocks_a_tick(
    world: Harness, user: pwd.struct_passwd
) -> None:
    """A FIFO as an audio path, and as the input itself: every tick stays short, the FIFO-input
    job is rejected as not a file, the FIFO audio is a bad line, and a restart blocks nothing."""
    home = _user_dir(world, user)
    os.mkfifo(home / "fifo.wav")
    os.mkfifo(home / "fifo.jsonl")
    _wav(home / "ok.wav", 1.0)
    (home / "in.jsonl").write_text('{"audio": "fifo.wav"}\n{"audio": "ok.wav"}\n')
    for p in home.iterdir():
        os.lchown(p, user.pw_uid, user.pw_gid)
    _drop(world, "fifo-audio.json", {"input": str(home / "in.jsonl"),
          "output": str(home / "a.out")}, user.pw_uid)  # fmt: skip
    _drop(world, "fifo-input.json", {"input": str(home / "fifo.jsonl"),
          "output": str(home / "b.out")}, user.pw_uid)  # fmt: skip
    got = _tick_until_decided(world, {"fifo-audio.json", "fifo-input.json"})
    assert len(got.accepted) == 1 and got.rejected == ["fifo-input.json"]
    assert "is not a file (a FIFO)" in _reason(world, "fifo-input.json")
    accepted = world.daemon.log.events("job_accepted")
    assert accepted[0]["bad_lines"] == 1 and "a FIFO" in accepted[0]["scan_note"]
    # The same after a restart (a fresh daemon on the same spool and ledger).
    world.daemon = world.new_daemon()
    world.daemon.log = Recorder()
    _drop(world, "again.json", {"input": str(home / "fifo.jsonl"),
          "output": str(home / "c.out")}, user.pw_uid)  # fmt: skip
    again = _tick_until_decided(world, {"again.json"})
    assert again.rejected == ["again.json"]


# -- row 5 -----------------------------------------------------------------------------------------


def test_row5_another_users_writable_job_file_is_refused(
    world: Harness, user: pwd.struct_passwd
) -> None:
    """A victim's group-writable (or world-writable) job file, edited by someone else and moved
    into incoming/, is refused: nothing runs as the victim. The same file not writable by
    others is accepted."""
    home = _user_dir(world, user)
    body = {"input": str(world.data / "in.jsonl")}
    _drop(world, "g.json", {**body, "output": str(home / "g.out")}, user.pw_uid, 0o664)
    _drop(world, "o.json", {**body, "output": str(home / "o.out")}, user.pw_uid, 0o646)
    _drop(world, "ok.json", {**body, "output": str(home / "ok.out")}, user.pw_uid, 0o640)
    got = _tick_until_decided(world, {"g.json", "o.json", "ok.json"})
    assert sorted(got.rejected) == ["g.json", "o.json"] and len(got.accepted) == 1
    for name, mode in (("g.json", "0664"), ("o.json", "0646")):
        assert f"group- or world-writable (mode {mode})" in _reason(world, name)
    assert [j.output for j in world.daemon.ledger.jobs()] == [str(home / "ok.out")]


# -- row 6 -----------------------------------------------------------------------------------------


def test_row6_lying_headers_never_reserve_more_than_a_gpu(
    user: pwd.struct_passwd, open_dir: Path
) -> None:
    """With ``min_free_gib = 0``: a 99-byte FLAC whose header claims 12.4 h is a bad line (the
    claim is checked against the audio there is) and a 4 KB WAV claiming as much counts for what
    its file holds, so the need rests on the batch budget; and even a forged scanner answer of
    12.4 h reserves at most the largest GPU (141 GiB)."""
    h = _harness(open_dir, min_free_gib=0.0)
    h.set_gpus([gpu_entry(0, 141, total_gib=141)])
    h.tick()  # the daemon has now seen its GPUs
    home = _user_dir(h, user)
    _lying_wav(home / "liar.wav", 12.4)
    _lying_flac(home / "liar.flac", 12.4)
    (home / "in.jsonl").write_text('{"audio": "liar.wav"}\n{"audio": "liar.flac"}\n')
    _drop(h, "liar.json", {"input": str(home / "in.jsonl"), "output": str(home / "x.out"),
          "min_free_gib": 0}, user.pw_uid)  # fmt: skip
    got = _tick_until_decided(h, {"liar.json"})
    job = h.job(got.accepted[0])
    assert job.need_gib == need_gib(0.0, h.settings.default_batch_seconds)
    note = h.daemon.log.events("job_accepted")[0]["scan_note"]
    assert note.startswith("1 bad line(s)") and "header claims 44640.0 s" in note
    # A scanner answer is untrusted: one claiming 12.4 h is validated and capped.
    forged = h.tmp / "forged_scan.py"
    forged.write_text(
        "import json, sys\nreq = json.load(sys.stdin)\nprint(json.dumps({'jobs': [{'key': j['key'],"
        " 'problem': None, 'lines': 1, 'bad': 0, 'longest_s': 44640.0, 'total_s': 44640.0,"
        " 'note': None} for j in req['jobs']]}))\n"
    )
    h.daemon.intake_stage.scan_argv = [sys.executable, str(forged)]
    _drop(h, "forged.json", {"input": str(home / "in.jsonl"), "output": str(home / "y.out"),
          "min_free_gib": 0}, user.pw_uid)  # fmt: skip
    got = _tick_until_decided(h, {"forged.json"})
    assert need_gib(44640.0, h.settings.default_batch_seconds) > 1000
    assert h.job(got.accepted[0]).need_gib == 141.0
    h.daemon.intake_stage.close()


# -- row 7 -----------------------------------------------------------------------------------------


def test_row7_private_paths_answer_like_missing_ones_and_leak_no_duration(
    world: Harness, user: pwd.struct_passwd
) -> None:
    """A submitter learns nothing about paths they cannot reach: a tokenizer or input under
    root's private folder is refused with the very words of a missing one, and a private clip's
    duration does not enter the need (the same job by root, who can read it, needs more)."""
    home = _user_dir(world, user)
    private = world.tmp / "private"
    private.mkdir(mode=0o700)
    (private / "tok").mkdir()
    _wav(private / "long.wav", 600.0)
    (private / "in.jsonl").write_text('{"audio": "long.wav"}\n')
    (home / "in.jsonl").write_text(f'{{"audio": "{private / "long.wav"}"}}\n')
    inp = str(world.data / "in.jsonl")
    cases = {
        "tok-private.json": {"input": inp, "tokenizer": str(private / "tok")},
        "tok-missing.json": {"input": inp, "tokenizer": str(private / "none")},
        "tok-root.json": {"input": inp, "tokenizer": "/root/.bashrc"},
        "in-private.json": {"input": str(private / "in.jsonl")},
        "in-missing.json": {"input": str(private / "none.jsonl")},
        "leak.json": {"input": str(home / "in.jsonl"), "batch_seconds": 60},
    }
    for i, (name, body) in enumerate(cases.items()):
        _drop(world, name, {"output": str(home / f"{i}.out"), **body}, user.pw_uid)
    got = _tick_until_decided(world, set(cases))
    assert len(got.accepted) == 1
    who = f"{user.pw_name} (uid {user.pw_uid})"
    for name in ("tok-private.json", "tok-missing.json", "tok-root.json"):
        path = cases[name]["tokenizer"]
        assert _reason(world, name) == f"tokenizer {path} does not exist or {who} cannot reach it"
    for name in ("in-private.json", "in-missing.json"):
        path = cases[name]["input"]
        assert _reason(world, name) == f"input {path} does not exist or {who} cannot reach it"
    assert world.job(got.accepted[0]).need_gib == need_gib(0.0, 60)
    # Root can read the clip: the same input sizes a larger need (the duration mattered).
    _drop(world, "root.json", {"input": str(home / "in.jsonl"), "batch_seconds": 60,
          "output": str(world.data / "root.out")}, 0)  # fmt: skip
    world.daemon.identity_for = lambda uid: privileges.current_identity()
    root_job = _tick_until_decided(world, {"root.json"}).accepted[0]
    assert world.job(root_job).need_gib == need_gib(600.0, 60) > need_gib(0.0, 60)


# -- row 8 -----------------------------------------------------------------------------------------


def test_row8_a_2gib_input_without_newline_is_read_bounded(
    world: Harness, user: pwd.struct_passwd
) -> None:
    """A sparse 2 GiB input with no newline: the daemon's memory does not grow (it never opens
    it), no tick is long, and the scanner reads it bounded (one over-long bad line)."""
    home = _user_dir(world, user)
    big = home / "big.jsonl"
    with open(big, "wb") as f:
        f.truncate(2 << 30)
    os.chown(big, user.pw_uid, user.pw_gid)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _drop(world, "big.json", {"input": str(big), "output": str(home / "o")}, user.pw_uid)
    got = _tick_until_decided(world, {"big.json"})
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 64, f"the daemon grew by {grown_mib:.0f} MiB"
    assert len(got.accepted) == 1
    note = world.daemon.log.events("job_accepted")[0]["scan_note"]
    assert "first 268435456 bytes" in note


# -- row 10 ----------------------------------------------------------------------------------------


def _tmpfs(size: str, prefix: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on a new folder, unmounted and removed afterwards."""
    mnt = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mnt)],
                       check=True, capture_output=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        shutil.rmtree(mnt, ignore_errors=True)


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A 4 MiB tmpfs: a state folder whose disk can be filled for real."""
    yield from _tmpfs("4m", "gpuspool-full-")


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\1" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def test_row10_full_state_disk_keeps_a_valid_job_and_retries(
    user: pwd.struct_passwd, open_dir: Path, small_disk: Path
) -> None:
    """The ledger's disk is full: a valid job is not rejected; its file stays in incoming/, one
    log line says why, and once there is room again it is accepted."""
    h = _harness(open_dir, state_dir=small_disk / "state")
    home = _user_dir(h, user)
    filler = _fill(small_disk)
    _drop(h, "valid.json", {"input": str(h.data / "in.jsonl"), "output": str(home / "o")},
          user.pw_uid)  # fmt: skip
    for _ in range(60):  # intake alone: the rest of a tick writes to the ledger too
        h.now += 1.0
        h.daemon.intake(h.now, TickReport())
        time.sleep(0.05)
    assert (h.settings.incoming_dir / "valid.json").exists()
    assert h.daemon.spool.reason_files() == [] and h.daemon.ledger.jobs() == []
    retries = h.daemon.log.events("intake_retry_later")
    assert len(retries) == 1 and "full" in retries[0]["error"], retries
    filler.unlink()
    h.now += h.settings.intake_retry_s
    got = _tick_until_decided(h, {"valid.json"})
    assert len(got.accepted) == 1 and got.rejected == []
    h.daemon.ledger.close()


# -- row 11 ----------------------------------------------------------------------------------------


def test_row11_100000_junk_files_keep_ticks_short_and_others_served(
    user: pwd.struct_passwd, ram_dir: Path
) -> None:
    """100,000 junk files of one user: every tick stays short (bounded intake, so the watchdog
    keeps pinging) and another user's valid job is accepted within the first ticks."""
    ram_dir.chmod(0o755)
    h = _harness(ram_dir)
    inc = h.settings.incoming_dir
    for i in range(100_000):
        p = inc / f"junk{i:06d}.json"
        p.write_bytes(b"{junk")
        os.chown(p, user.pw_uid, user.pw_gid)
    nobody = pwd.getpwnam("nobody")
    out = _user_dir(h, nobody, "nobody-out")
    _drop(h, "zzz-valid.json", {"input": str(h.data / "in.jsonl"), "output": str(out / "o")},
          nobody.pw_uid)  # fmt: skip
    accepted: list[str] = []
    longest = 0.0
    ticks = 0
    while not accepted:
        ticks += 1
        assert ticks <= 60, "the valid job was not taken in"
        t0 = time.monotonic()
        report = h.tick(settle_intake=False)
        longest = max(longest, time.monotonic() - t0)
        accepted += report.accepted
        time.sleep(0.05)
    assert longest < TICK_LIMIT_S, f"a tick took {longest:.1f} s"
    rejected = 100_000 - sum(1 for n in os.listdir(inc) if n.startswith("junk"))
    assert 0 < rejected <= ticks * h.settings.intake_max_files
    print(f"valid job accepted at tick {ticks}; longest tick {longest:.2f} s")


# -- row 15 ----------------------------------------------------------------------------------------


@pytest.fixture
def spool_disk() -> Iterator[Path]:
    """A tmpfs for the spool, which the test can remount read-only."""
    yield from _tmpfs("16m", "gpuspool-ro-")


def test_row15_read_only_spool_logs_once_and_rejects_nothing(
    user: pwd.struct_passwd, open_dir: Path, spool_disk: Path
) -> None:
    """The spool turns read-only under a valid job: no ``job_rejected``, one log line however
    many ticks, the job queued once; when the spool is writable again its file is moved."""
    h = _harness(open_dir, spool_dir=spool_disk / "spool")
    home = _user_dir(h, user)
    _drop(h, "valid.json", {"input": str(h.data / "in.jsonl"), "output": str(home / "o")},
          user.pw_uid)  # fmt: skip
    subprocess.run(["mount", "-o", "remount,ro", str(spool_disk)], check=True)
    try:
        for _ in range(70):  # more than one retry (intake_retry_s = 30 ticks)
            h.tick(settle_intake=False)
            time.sleep(0.02)
        log = h.daemon.log
        assert log.events("job_rejected") == []
        assert len(log.events("intake_retry_later")) == 1
        assert [j.state.value for j in h.daemon.ledger.jobs()] == ["queued"]
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(spool_disk)], check=True)
    h.now += h.settings.intake_retry_s
    h.tick()
    job = h.daemon.ledger.jobs()[0]
    assert (h.settings.accepted_dir / f"{job.id}.json").exists()
    assert not (h.settings.incoming_dir / "valid.json").exists()


def test_row15_lost_ledger_requeues_accepted_jobs(world: Harness, user: pwd.struct_passwd) -> None:
    """The ledger is deleted while jobs are queued: at start-up every accepted file without a
    ledger row is scanned again as its owner and queued under its job id; nothing is lost."""
    home = _user_dir(world, user)
    ids = []
    for n in range(3):
        _drop(world, f"j{n}.json", {"input": str(world.data / "in.jsonl"),
              "output": str(home / f"{n}.out")}, user.pw_uid)  # fmt: skip
    ids = sorted(world.tick().accepted)
    assert len(ids) == 3
    world.daemon.ledger.close()
    for p in world.settings.state_dir.glob("ledger.sqlite3*"):
        p.unlink()
    world.daemon = world.new_daemon()
    world.daemon.log = Recorder()
    world.tick()
    jobs = world.daemon.ledger.jobs()
    assert sorted(j.id for j in jobs) == ids
    assert {j.state.value for j in jobs} == {"queued"}
    assert {j.submitter_uid for j in jobs} == {user.pw_uid}
    assert world.daemon.log.events("jobs_requeued_from_spool")[0]["count"] == 3
    assert sorted(p.stem for p in world.settings.accepted_dir.iterdir()) == ids
