"""The plot's data from a recorded run (fake time), and the PNG drawn from it."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

from gpuspool.plot import data_since, draw, plot_data, y_ceiling
from tests.conftest import Harness, gpu_entry


def recorded_run(harness: Harness) -> tuple[str, str]:
    """Two minutes at 10 GiB free (job waits), then 50 GiB: the job runs and finishes."""
    harness.set_gpus([gpu_entry(0, 10), gpu_entry(1, 30, error="GPU is lost")])
    job = harness.submit("plotted")
    for _ in range(24):
        harness.tick(5.0)
    harness.set_gpus([gpu_entry(0, 50), gpu_entry(1, 15)])
    for _ in range(3):
        harness.tick(5.0)
    assert harness.settle(job) == "done"
    for _ in range(6):
        harness.tick(5.0)
    return job, "GPU-sim-0"


def test_plot_data_has_the_gpu_series_threshold_and_job_lifetime(harness: Harness) -> None:
    """Free memory steps from 10 to 50 GiB; the job waits, then runs on GPU 0 and ends done."""
    job, uuid = recorded_run(harness)
    start = 1000.0
    data = plot_data(harness.daemon.ledger, since=start, until=harness.now, threshold_gib=20.0)
    series = data.free_gib[uuid]
    values = [v for _, v in series]
    assert values[0] == 10.0 and values[-1] == 50.0
    assert sorted(set(values)) == [10.0, 50.0]
    assert all(a < b for (a, _), (b, _) in itertools.pairwise(series))
    # The lost GPU is a gap (None), not zero, until it comes back.
    assert data.free_gib["GPU-sim-1"][0][1] is None and data.free_gib["GPU-sim-1"][-1][1] == 15.0
    assert data.total_gib[uuid] == 80.0 and data.threshold_gib == 20.0
    [lane] = data.jobs
    assert lane.job_id == job and lane.label == "plotted"
    wait, run = lane.segments
    record = harness.job(job)
    assert (wait.kind, wait.start, wait.end) == ("wait", record.submitted_at, record.started_at)
    assert (run.kind, run.start, run.end) == ("run", record.started_at, record.finished_at)
    assert run.gpu_uuid == uuid and run.outcome == "done"
    # The GPU rose above the threshold before the job started (stability window).
    rose = next(t for t, v in series if v == 50.0)
    assert rose <= run.start


def test_plot_downsamples_long_history(harness: Harness) -> None:
    """With a small point budget each GPU keeps at most that many slices, keeping the minimum."""
    recorded_run(harness)
    data = plot_data(
        harness.daemon.ledger, since=1000.0, until=harness.now, threshold_gib=20.0, max_points=4
    )
    series = data.free_gib["GPU-sim-0"]
    assert len(series) <= 5
    assert min(v for _, v in series if v is not None) == 10.0


def test_draw_writes_a_png(harness: Harness, tmp_path: Path) -> None:
    """The recorded run draws to a PNG file."""
    recorded_run(harness)
    data = plot_data(harness.daemon.ledger, since=1000.0, until=harness.now, threshold_gib=20.0)
    out = tmp_path / "plot.png"
    draw(data, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000


def test_default_window_fits_a_short_run(harness: Harness) -> None:
    """A daemon that ran for minutes gets a window of minutes, not 24 h."""
    recorded_run(harness)
    since = data_since(harness.daemon.ledger, harness.now)
    assert since <= 1000.0 and harness.now - since < 600.0


def test_an_impossible_threshold_does_not_stretch_the_axis(harness: Harness) -> None:
    """One job's 500 GiB threshold on 80 GiB GPUs: the memory axis still ends near 80 GiB."""
    recorded_run(harness)
    data = plot_data(harness.daemon.ledger, since=1000.0, until=harness.now, threshold_gib=20.0)
    data.jobs[0].threshold_gib = 500.0
    assert y_ceiling(data) == 80.0
    data.threshold_gib = 500.0  # even the default: no GPU here reaches it
    assert y_ceiling(data) == 80.0


def test_plot_without_matplotlib_keeps_the_extra_in_its_hint(
    harness: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """The install hint names `gpuspool[plot]` (rich markup used to eat the brackets)."""
    from gpuspool.cli import main

    harness.tick()
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'state_dir = "{harness.settings.state_dir}"\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    code = main(["--config", str(cfg), "plot", "-o", str(tmp_path / "p.png")])
    err = capsys.readouterr().err
    assert code == 1 and "pip install 'gpuspool[plot]'" in err
