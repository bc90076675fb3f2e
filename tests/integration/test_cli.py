"""The command line against a real ledger and spool (the daemon's tick runs in-process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpuspool.cli import main
from tests.conftest import Harness, gpu_entry


@pytest.fixture
def cli(harness: Harness) -> tuple[Harness, Path]:
    cfg = harness.tmp / "gpuspool.toml"
    cfg.write_text(
        f'spool_dir = "{harness.settings.spool_dir}"\n'
        f'state_dir = "{harness.settings.state_dir}"\n'
        f'gpu_source = "file:{harness.gpu_file}"\n'
        "min_free_gib = 20.0\n"
    )
    return harness, cfg


def run(cfg: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what the in-process daemon logged before
    code = main(["--config", str(cfg), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_submit_prints_id_need_and_threshold_and_daemon_agrees(
    cli: tuple[Harness, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """submit publishes into incoming/ and prints the id the daemon then gives the job."""
    h, cfg = cli
    code, out, _ = run(
        cfg, capsys, "submit", "-i", str(h.data / "in.jsonl"), "-o", str(h.data / "o.jsonl"),
        "--tokenizer", "Qwen/tiny", "--name", "first", "--min-free-gib", "auto", "--json",
    )  # fmt: skip
    assert code == 0
    result = json.loads(out)
    assert result["threshold_gib"] == result["need_gib"] > 0
    assert Path(result["file"]).parent == h.settings.incoming_dir
    report = h.tick()
    assert report.accepted == [result["job_id"]]
    assert h.job(result["job_id"]).threshold_gib == result["threshold_gib"]


def test_submit_refuses_bad_fields_with_their_names(
    cli: tuple[Harness, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad job is refused before it reaches the spool, naming the field."""
    h, cfg = cli
    code, _, err = run(cfg, capsys, "submit", "-i", "x.jsonl", "-o", "/tmp/o", "--dtype", "fp8")
    assert code == 1 and "dtype" in err
    assert (
        list(h.settings.incoming_dir.glob("*")) == [] if h.settings.incoming_dir.exists() else True
    )


def test_status_show_hold_release_cancel_retry(
    cli: tuple[Harness, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Each command changes or shows the job as it says, and the ledger records it."""
    h, cfg = cli
    job = h.submit("a")
    h.tick()
    code, out, _ = run(cfg, capsys, "status", "--json")
    data = json.loads(out)
    assert code == 0 and data["jobs"][0]["id"] == job
    assert "need 20.0" in data["jobs"][0]["waiting_for"]
    assert run(cfg, capsys, "hold", job[:6])[0] == 0
    assert h.state(job) == "held"
    h.set_gpus([gpu_entry(0, 70)])
    for _ in range(4):
        h.tick()
    assert h.state(job) == "held" and "held" in h.job(job).reason
    assert run(cfg, capsys, "release", job)[0] == 0
    assert h.state(job) == "queued"
    assert run(cfg, capsys, "cancel", job)[0] == 0
    assert h.state(job) == "cancelled"
    code, _, err = run(cfg, capsys, "hold", job)
    assert code == 1 and "cancelled" in err
    assert run(cfg, capsys, "retry", job)[0] == 0
    assert h.state(job) == "queued"
    code, out, _ = run(cfg, capsys, "show", job)
    shown = json.loads(out)
    states = [t["to_state"] for t in shown["transitions"]]
    assert states == ["queued", "held", "queued", "cancelled", "queued"]
    assert shown["spec"]["tokenizer"] == "tiny"
    code, _, err = run(cfg, capsys, "show", "nope")
    assert code == 1 and "no job matches" in err


def test_status_and_gpus_fall_back_to_the_published_snapshot(
    cli: tuple[Harness, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A user who cannot open the ledger sees the daemon's published snapshot instead."""
    from gpuspool.views import publish_snapshot

    h, cfg = cli
    job = h.submit("a")
    h.tick()
    publish_snapshot(
        h.settings.status_snapshot_path, h.daemon.ledger, h.now, threshold_gib=20.0,
        stable_polls=3,
    )  # fmt: skip
    snap_dir = h.settings.status_snapshot_path.parent
    assert snap_dir.stat().st_mode & 0o777 == 0o750
    assert h.settings.status_snapshot_path.stat().st_mode & 0o777 == 0o640
    h.settings.ledger_path.rename(h.tmp / "hidden.sqlite3")  # as if it were not ours to open
    code, out, _ = run(cfg, capsys, "status", "--json")
    data = json.loads(out)
    assert code == 0 and data["jobs"][0]["id"] == job
    assert "need 20.0" in data["jobs"][0]["waiting_for"]
    code, out, _ = run(cfg, capsys, "gpus", "--json")
    assert code == 0 and json.loads(out)["gpus"][0]["uuid"] == "GPU-sim-0"
    h.settings.status_snapshot_path.unlink()
    code, _, err = run(cfg, capsys, "status")
    assert code == 2 and "no status snapshot" in err
