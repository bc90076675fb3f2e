"""status / gpus / logs views: data and rendering, without a terminal."""

from __future__ import annotations

import json
import os

from rich.console import Console

from gpuspool.views import (
    gpus_data,
    gpus_snapshot,
    gpus_view,
    log_json,
    log_line,
    status_data,
    status_view,
)
from tests.conftest import Harness, gpu_entry


def render(renderable: object, width: int = 200) -> str:
    console = Console(width=width, record=True, force_terminal=False, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_status_shows_progress_and_wait_reason(harness: Harness) -> None:
    """A finished job shows lines done; a waiting one shows why it waits; draining is shown."""
    harness.set_gpus([gpu_entry(0, 50)])
    done = harness.submit("first")
    for _ in range(3):
        harness.tick()
    assert harness.settle(done) == "done"
    harness.set_gpus([gpu_entry(0, 5)])
    waiting = harness.submit("second")
    harness.tick()
    harness.daemon.ledger.set_draining(True)
    harness.tick()
    data = status_data(harness.daemon.ledger, harness.now)
    by_id = {j["id"]: j for j in data["jobs"]}
    assert by_id[done]["progress"]["lines_done"] == 4 and by_id[done]["state"] == "done"
    assert by_id[waiting]["waiting_for"].startswith("draining")
    assert data["draining"] is True and data["counts"]["queued"] == 1
    text = render(status_view(data))
    assert "DRAINING" in text
    assert "4/4 100%" in text
    assert "draining: no new jobs start" in text


def test_status_view_flags_a_stale_daemon(harness: Harness) -> None:
    """When the last tick is long past, the header says the daemon may not be running."""
    harness.tick()
    data = status_data(harness.daemon.ledger, harness.now + 600)
    assert "daemon not running?" in render(status_view(data, poll_interval_s=1.0))


def test_gpus_marks_our_process_and_counts_stable_polls(harness: Harness) -> None:
    """A running job's worker pid is marked ours; a stranger's is not; stable polls count."""
    harness.set_gpus([gpu_entry(0, 50)])
    harness.env["STUB_MODE"] = "sleep"
    job = harness.submit("long")
    for _ in range(3):
        harness.tick()
    pid = harness.job(job).pid
    assert pid is not None
    procs = [{"pid": pid, "used_mib": 2048}, {"pid": os.getpid(), "used_mib": 100}]
    harness.set_gpus([gpu_entry(0, 40, processes=procs)])
    harness.tick()
    harness.tick()
    running = harness.daemon.ledger.jobs()
    data = gpus_data(gpus_snapshot(harness.daemon.ledger), running, 20.0, 3)
    gpu = data["gpus"][0]
    assert [(p["pid"], p["job_id"]) for p in gpu["processes"]] == [(pid, job), (os.getpid(), None)]
    assert gpu["meets_threshold"] is True
    assert gpu["stable_polls"] == 3
    text = render(gpus_view(data, harness.now))
    assert f"★ {pid} 2.0 GiB job long" in text
    harness.daemon.stop_all(harness.now, hard=True)
    harness.settle(job)


def test_log_lines_pretty_and_json() -> None:
    """Worker and daemon events read well on a terminal; non-JSON output is wrapped as JSON."""
    progress = json.dumps({"event": "progress", "ts": 0, "lines_done": 3, "lines_total": 12,
                           "audio_s_per_s": 41.234})  # fmt: skip
    assert "progress 3/12 (25%) audio_s_per_s=41.23" in log_line(progress).plain
    daemon = json.dumps({"event": "job_started", "source": "daemon", "gpu_uuid": "GPU-1"})
    assert log_line(daemon).plain.split() == ["daemon", "job_started", "gpu_uuid=GPU-1"]
    assert log_json(progress) == progress
    wrapped = json.loads(log_json("Traceback (most recent call last):"))
    assert wrapped == {
        "event": "output",
        "source": "worker",
        "line": "Traceback (most recent call last):",
    }


def test_log_lines_cut_a_long_line_and_keep_the_rest_across_chunks() -> None:
    """Lines split over reads come out whole; a line longer than MAX_LOG_LINE is cut, with the
    number of bytes cut, and the next line is intact."""
    from gpuspool.views import MAX_LOG_LINE, LogLines

    lines = LogLines()
    got = lines.feed(b"one\ntw") + lines.feed(b"o\n" + b"x" * (MAX_LOG_LINE + 10))
    got += lines.feed(b"y" * 5 + b"\nthree") + lines.rest()
    assert got[:2] == ["one", "two"] and got[3] == "three"
    assert got[2].startswith("x" * MAX_LOG_LINE) and got[2].endswith(
        "15 more bytes of this line cut]"
    )
    assert lines.rest() == []


def test_root_status_table_shows_each_submitters_share() -> None:
    """The fair-share line names each submitter's share of recent GPU use and their jobs."""
    from rich.console import Console

    from gpuspool.views import status_view

    counts = dict.fromkeys(("running", "queued", "interrupted", "deferred", "held", "done",
                            "failed"), 0)  # fmt: skip
    data = {"at": 0.0, "draining": False, "last_tick": None, "counts": counts, "jobs": [],
            "submitters": [{"user": "alice", "uid": 1001, "usage_gpu_s": 620.0, "share": 0.62,
                            "running": 2, "waiting": 5},
                           {"user": "\x1b[31mbob", "uid": 1002, "usage_gpu_s": 380.0,
                            "share": 0.38, "running": 0, "waiting": 1}]}  # fmt: skip
    console = Console(width=120, record=True)
    console.print(status_view(data))
    text = console.export_text()
    assert (
        "shares: alice 62% (2 running, 5 waiting) · \\x1b[31mbob 38% (0 running, 1 waiting)" in text
    )
