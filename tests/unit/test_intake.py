"""The intake stage on its own: bounded, fair, never waiting on a scan, and treating the
scanner's answer as untrusted. Scanners are real processes (stand-ins where a failure is the
point); no worker is started."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gpuspool.daemon import TickReport
from gpuspool.intake import Key
from tests.conftest import Harness, gpu_entry


class Recorder:
    """Keeps what the daemon logs: (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        def log(event: str, **fields: Any) -> None:
            self.lines.append((level, event, fields))

        return log

    def events(self, name: str) -> list[dict[str, Any]]:
        return [f for _, e, f in self.lines if e == name]


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    harness = Harness(tmp_path)
    harness.set_gpus([gpu_entry(0, 0)])
    harness.daemon.log = Recorder()
    return harness


def _stand_in(h: Harness, body: str) -> list[str]:
    """A scanner stand-in running ``body`` (Python), as argv."""
    path = h.tmp / f"scanner{abs(hash(body))}.py"
    path.write_text(body)
    return [sys.executable, str(path)]


def _intake(h: Harness) -> TickReport:
    report = TickReport()
    h.now += 1.0
    t0 = time.monotonic()
    h.daemon.intake(h.now, report)
    assert time.monotonic() - t0 < 5.0, "intake waited"
    return report


def _until_decided(h: Harness, ticks: int = 300) -> TickReport:
    total = TickReport()
    for _ in range(ticks):
        report = _intake(h)
        total.accepted += report.accepted
        total.rejected += report.rejected
        if h.daemon.intake_stage.idle(h.now):
            return total
        time.sleep(0.02)
    raise AssertionError("intake never settled")


def _reasons(h: Harness) -> list[str]:
    return [p.read_text().partition("\nreason: ")[2].strip() for p in h.daemon.spool.reason_files()]


def test_fair_order_takes_one_file_per_owner_in_turn(h: Harness) -> None:
    """A flood of one owner is interleaved with the others, and the owner served first
    rotates from one tick to the next."""
    stage = h.daemon.intake_stage
    flood: list[Key] = [("incoming", f"a{i}".encode()) for i in range(5)]
    other: list[Key] = [("incoming", b"b0"), ("incoming", b"b1")]
    first = list(stage._fair({1000: flood, 1001: other}))
    assert first[:4] == [flood[0], other[0], flood[1], other[1]] and first[4:] == flood[2:]
    second = list(stage._fair({1000: flood, 1001: other}))
    assert second[0] == other[0]


def test_at_most_intake_max_files_per_tick(tmp_path: Path) -> None:
    """With ``intake_max_files = 3``, ten bad files take four ticks, three at a time."""
    h = Harness(tmp_path, intake_max_files=3)
    h.daemon.log = Recorder()
    for i in range(10):
        h.drop_raw(f"bad{i}.json", b"{nope")
    counts = [len(_intake(h).rejected) for _ in range(4)]
    assert counts == [3, 3, 3, 1]


def test_a_tick_never_waits_on_a_scan(h: Harness) -> None:
    """A scan that never ends does not hold a tick; the file stays in incoming/ meanwhile and
    is rejected, with the reason, once the scan's wall-clock limit has passed."""
    h.daemon.intake_stage.scan_argv = _stand_in(h, "import time\ntime.sleep(600)\n")
    h.settings = h.daemon.settings = h.settings.model_copy(update={"scan_timeout_s": 1.0})
    h.submit("slow")
    _intake(h)
    assert h.daemon.intake_stage.scanning == 1 and h.daemon.spool.pending()
    got = _until_decided(h)
    assert len(got.rejected) == 1
    assert "the scanner failed: it took longer than 1 s" in _reasons(h)[0]


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ("import os\nos.abort()\n", "it was killed by SIGABRT"),
        ("raise SystemExit('no luck')\n", "it exited with status 1: no luck"),
        ("print('nonsense')\n", "its answer was not valid"),
        ("import sys\nsys.stdout.write('x' * 1_000_000)\n", "its answer was longer than"),
        (
            "import json, sys\nreq = json.load(sys.stdin)\nprint(json.dumps({'jobs': [{'key': "
            "j['key'], 'problem': None, 'lines': 1, 'bad': 0, 'longest_s': float('nan'), "
            "'total_s': 1.0, 'note': None} for j in req['jobs']]}))\n",
            "its answer was not valid",
        ),
        (
            "import json, sys\nreq = json.load(sys.stdin)\nprint(json.dumps({'jobs': [{'key': "
            "j['key'], 'problem': 'x' * 1_000, 'lines': 1, 'bad': 0, 'longest_s': 1.0, "
            "'total_s': 1.0, 'note': None} for j in req['jobs']]}))\n",
            "its answer was not valid",
        ),
    ],
)
def test_a_failed_batch_is_split_and_each_job_gets_the_reason(
    h: Harness, body: str, why: str
) -> None:
    """A scanner that crashes, exits, talks nonsense, floods or answers out of bounds: its
    batch is scanned again one job at a time, and each job is rejected with the reason."""
    h.daemon.intake_stage.scan_argv = _stand_in(h, body)
    h.submit("one")
    h.submit("two")
    got = _until_decided(h)
    assert len(got.rejected) == 2 and got.accepted == []
    assert all(why in r for r in _reasons(h)), _reasons(h)
    assert len(h.daemon.log.events("scan_batch_failed")) == 1


def test_scanners_are_bounded_by_scan_concurrency(tmp_path: Path) -> None:
    """One scanner at a time, two jobs each: five valid jobs are all accepted, in three scans."""
    h = Harness(tmp_path, scan_concurrency=1, scan_batch=2)
    h.daemon.log = Recorder()
    for i in range(5):
        h.submit(f"j{i}")
    most = 0
    total = TickReport()
    for _ in range(300):
        report = _intake(h)
        total.accepted += report.accepted
        most = max(most, len(h.daemon.intake_stage._batches))
        if h.daemon.intake_stage.idle(h.now):
            break
        time.sleep(0.02)
    assert len(total.accepted) == 5 and most == 1


def test_a_daemon_side_error_defers_the_file_and_logs_once(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Moving the file to accepted/ fails (the spool's disk): no rejection, one log line over
    many ticks, the job queued once; after the retry delay, with the disk back, it moves."""
    job = h.submit("j")

    def no_room(raw: object) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(h.daemon.spool, "accept", no_room)
    for _ in range(40):
        _intake(h)
        time.sleep(0.02)
    log = h.daemon.log
    assert log.events("job_rejected") == [] and len(log.events("intake_retry_later")) == 1
    assert h.daemon.spool.pending() and h.state(job) == "queued"
    monkeypatch.undo()
    h.now += h.settings.intake_retry_s
    _until_decided(h)
    assert (h.settings.accepted_dir / f"{job}.json").exists()
    assert len(log.events("intake_recovered")) == 1


def test_a_file_replaced_during_its_scan_is_not_taken_with_the_old_content(h: Harness) -> None:
    """The file is swapped for a different job while its scan runs: the scan's answer is not
    applied to it; the new content is read and scanned afresh."""
    first = {"input": str(h.data / "in.jsonl"), "output": str(h.data / "first.out"),
             "tokenizer": "tiny"}  # fmt: skip
    path = h.drop_raw("swap.json", json.dumps(first).encode())
    _intake(h)
    assert h.daemon.intake_stage.scanning == 1
    tmp = h.tmp / "swap.json"
    tmp.write_text(json.dumps({**first, "output": str(h.data / "second.out")}))
    os.rename(tmp, path)
    _until_decided(h)
    assert [j.output for j in h.daemon.ledger.jobs()] == [str(h.data / "second.out")]


def test_a_daemon_that_cannot_switch_users_judges_the_submitters_rights(tmp_path: Path) -> None:
    """Not root, the daemon scans as itself; the scanner then also judges the submitter's
    rights from mode bits, so a submitter cannot borrow the daemon's (here: a private input)."""
    import pwd

    import soundfile as sf

    from gpuspool import scan

    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "in.jsonl").write_text("\n")
    nobody = pwd.getpwnam("nobody")
    who = {"uid": nobody.pw_uid, "gid": nobody.pw_gid, "groups": [nobody.pw_gid], "name": "nobody"}
    limits = {"max_lines": 10, "max_bytes": 1000, "max_line_bytes": 100}
    job = {"key": "0", "input": str(private / "in.jsonl"), "output": str(tmp_path / "o"),
           "tokenizer": "tiny"}  # fmt: skip
    assert scan.scan_job(job, limits, sf, "me")["problem"] is None
    problem = scan.scan_job({**job, "judge_for": who}, limits, sf, "me")["problem"]
    assert problem is not None and "nobody" in problem


def test_rejected_entries_are_pruned_after_the_retention(h: Harness) -> None:
    """Entries of rejected/ older than ``rejected_keep_days`` are deleted, newer ones kept; a
    link there is removed without touching its target."""
    rejected = h.settings.rejected_dir
    old, new = rejected / "old", rejected / "new"
    for p in (old, new, rejected / "old.reason"):
        p.write_text("x")
    (rejected / "old-link").symlink_to(h.data / "in.jsonl")
    long_ago = h.now - h.settings.rejected_keep_days * 86400 - 10
    for p in (old, rejected / "old.reason", rejected / "old-link"):
        os.utime(p, (long_ago, long_ago), follow_symlinks=False)
    os.utime(new, (h.now, h.now))
    _intake(h)
    assert sorted(p.name for p in rejected.iterdir()) == ["new"]
    assert (h.data / "in.jsonl").exists()
    assert h.daemon.log.events("rejected_pruned")[0]["count"] == 3
