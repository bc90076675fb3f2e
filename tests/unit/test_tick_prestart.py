"""``prestart``: the worker of the job next in line starts while its GPU's reading settles, waits
at its gate, and goes on with its GPU when the job starts; a worker nobody wants is stopped.

Scripted processes (FakeRunner) for the tick's decisions; the real runner and the stub worker
(real processes and pipes) for what the process sees.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from gpuspool.config import Settings
from gpuspool.daemon import PRESTARTED_NOTE
from gpuspool.runner import ProcessRunner
from tests.conftest import Harness, fake_runner, gpu_entry, prestarting, wait_until


def settling_job(h: Harness, **fields: Any) -> tuple[str, int]:
    """Submit job "a" to a GPU with room, one tick: its reading settles, its worker waits."""
    h.set_gpus([gpu_entry(0, 50)])
    job = h.submit("a", **fields)
    h.tick()
    assert h.state(job) == "queued"
    (launch,) = h.fake.launches
    assert launch.gated and launch.env["CUDA_VISIBLE_DEVICES"] == ""
    (pid,) = h.fake.gated
    return job, pid


def test_the_job_whose_gpu_settles_starts_in_its_prestarted_worker(tmp_path: Path) -> None:
    h = prestarting(tmp_path)
    with capture_logs() as logs:
        job, pid = settling_job(h)
        h.tick()
        assert h.state(job) == "queued" and len(h.fake.launches) == 1
        h.tick()
    rec = h.job(job)
    assert rec.state.value == "running" and rec.pid == pid
    assert len(h.fake.launches) == 1  # no second process
    proc = h.fake.process(pid)
    assert proc.launch.env["CUDA_VISIBLE_DEVICES"] == "GPU-sim-0"  # what the go line set
    assert proc.alive and h.fake.gated == set()
    (started,) = [e for e in logs if e["event"] == "job_started"]
    assert started["pid"] == pid and started["prestarted_s"] == 2.0
    assert [e["job_id"] for e in logs if e["event"] == "job_prestarted"] == [job]


def test_the_waiting_reason_says_the_worker_is_already_importing(tmp_path: Path) -> None:
    """``gpuspool show`` explains the user's process that runs before their job does; the note
    goes with the worker."""
    h = prestarting(tmp_path)
    job, pid = settling_job(h)
    reason = h.job(job).reason
    assert "starts once it stays so for 3 polls" in reason and reason.endswith(PRESTARTED_NOTE)
    urgent = h.submit("b", priority=5)  # first in line: it takes the prestart over
    h.tick()
    assert not h.fake.process(pid).alive and h.state(job) == "queued"
    assert not h.job(job).reason.endswith(PRESTARTED_NOTE)
    assert h.job(urgent).reason.endswith(PRESTARTED_NOTE)


def test_on_by_default() -> None:
    assert Settings.model_fields["prestart"].default is True


def test_off_the_worker_starts_with_its_gpu(tmp_path: Path) -> None:
    h = Harness(tmp_path, make_runner=fake_runner, prestart=False)
    job = h.start("sleep")
    assert h.state(job) == "running"
    (launch,) = h.fake.launches
    assert not launch.gated and launch.env["CUDA_VISIBLE_DEVICES"] == "GPU-sim-0"


def test_a_prestarted_worker_is_stopped_when_its_job_cannot_start_any_more(
    tmp_path: Path,
) -> None:
    """Cancelled: the worker is killed at its gate (it did nothing but import) and reaped; a
    GPU that only shrinks below the job's need keeps it waiting."""
    h = prestarting(tmp_path)
    job, pid = settling_job(h)
    h.set_gpus([gpu_entry(0, 5)])
    h.tick()
    assert h.fake.process(pid).alive  # still nearest: it keeps its worker
    h.daemon.ledger.request_cancel(job, now=h.now)
    with capture_logs() as logs:
        h.tick()
    proc = h.fake.process(pid)
    assert proc.returncode == 143 and h.fake.gated == set()  # closed gate: nothing done
    (stopped,) = [e for e in logs if e["event"] == "job_prestart_stopped"]
    assert stopped["job_id"] == job and stopped["pid"] == pid
    assert len(h.fake.launches) == 1
    assert h.fake.removed_scratch == [h.daemon.scratch_path(job)]


def test_another_job_first_in_line_takes_over_the_prestart(tmp_path: Path) -> None:
    h = prestarting(tmp_path)
    job, pid = settling_job(h)
    urgent = h.submit("b", priority=5)
    h.tick()
    assert not h.fake.process(pid).alive
    gated = [launch for launch in h.fake.launches if launch.gated]
    assert [launch.env["GPUSPOOL_JOB_ID"] for launch in gated] == [job, urgent]
    assert h.state(job) == "queued"


def test_a_worker_that_stops_at_its_gate_is_not_prestarted_again(tmp_path: Path) -> None:
    """It would fail the same way: the job starts the usual way, and says why when it does."""
    h = prestarting(tmp_path)
    job, pid = settling_job(h)
    h.fake.process(pid).exit(78)
    with capture_logs() as logs:
        h.tick()
        h.tick()
    (exited,) = [e for e in logs if e["event"] == "job_prestart_exited"]
    assert exited["exit_code"] == 78
    assert h.state(job) == "running"
    first, second = h.fake.launches
    assert first.gated and not second.gated
    assert second.env["CUDA_VISIBLE_DEVICES"] == "GPU-sim-0"


def test_a_gate_nobody_reads_falls_back_to_a_usual_start(tmp_path: Path) -> None:
    h = prestarting(tmp_path)
    job, pid = settling_job(h)
    h.tick()
    h.fake.gated.discard(pid)  # the process closed its end of the gate
    h.tick()
    rec = h.job(job)
    assert rec.state.value == "running" and rec.pid != pid
    assert h.fake.process(pid).returncode == -signal.SIGKILL
    assert not h.fake.launches[-1].gated


def test_a_config_change_while_waiting_starts_the_job_afresh(tmp_path: Path) -> None:
    """The waiting worker was started with the old extra flags: it is not let go on."""
    h = prestarting(tmp_path)
    job, pid = settling_job(h)
    h.tick()
    h.daemon.settings = h.settings.model_copy(update={"worker_extra_args": ["--tf32"]})
    h.tick()
    rec = h.job(job)
    assert rec.state.value == "running" and rec.pid != pid
    assert "--tf32" in h.fake.launches[-1].argv


def test_stopping_the_daemon_stops_the_prestarted_worker(tmp_path: Path) -> None:
    h = prestarting(tmp_path)
    job, pid = settling_job(h)
    h.daemon.stop_all(h.now)
    assert not h.fake.process(pid).alive and h.state(job) == "queued"


def _log_events(h: Harness, job: str) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for line in (h.settings.logs_dir / f"{job}.log").read_text().splitlines()
        if line.startswith("{")
    ]


def test_a_real_prestarted_process_waits_then_runs_on_its_gpu(tmp_path: Path) -> None:
    """Real processes and pipes: the stub worker blocks at its gate until the job starts; then
    the same process runs, with the GPU the go line named and no gate left in its environment."""
    h = Harness(tmp_path, prestart=True, stable_polls=3)
    h.env["STUB_MODE"] = "probe"
    h.set_gpus([gpu_entry(0, 50)])
    job = h.submit("a")
    h.tick()
    assert isinstance(h.runner, ProcessRunner)
    prestarted = h.daemon._prestarted
    assert prestarted is not None and h.state(job) == "queued"
    h.tick()
    assert h.runner.poll(prestarted.pid, prestarted.pid_start) is None  # still at its gate
    assert not (h.data / "a.out.jsonl").exists()
    h.tick()
    assert h.job(job).pid == prestarted.pid
    h.settle(job)
    assert h.state(job) == "done"
    (start,) = [e for e in _log_events(h, job) if e.get("event") == "start"]
    assert start["gpu"] == "GPU-sim-0"


def test_a_real_gate_closed_stops_the_process_with_nothing_done(tmp_path: Path) -> None:
    h = Harness(tmp_path, prestart=True, stable_polls=3)
    h.env["STUB_MODE"] = "ok"
    h.set_gpus([gpu_entry(0, 50)])
    job = h.submit("a")
    h.tick()
    prestarted = h.daemon._prestarted
    assert prestarted is not None and isinstance(h.runner, ProcessRunner)
    h.runner.close_gate(prestarted.pid)  # as a daemon that goes away does
    wait_until(lambda: h.runner.poll(prestarted.pid, prestarted.pid_start) is not None)
    assert not (h.data / "a.out.jsonl").exists()
    assert "not started" in (h.settings.logs_dir / f"{job}.log").read_text()


def test_an_earlier_attempts_scratch_folder_stays_when_the_prestart_is_stopped(
    tmp_path: Path,
) -> None:
    """A retry keeps its scratch folder (TMPDIR, caches); only one the prestart made goes."""
    h = prestarting(tmp_path)
    h.set_gpus([gpu_entry(0, 50)])
    job = h.submit("a")
    h.settle_intake()
    h.daemon.scratch_path(job).mkdir(parents=True)  # left by an earlier attempt
    h.tick()
    assert h.fake.gated
    h.daemon.ledger.request_cancel(job, now=h.now)
    h.tick()
    assert h.fake.gated == set() and h.fake.removed_scratch == []


def test_a_worker_that_waited_two_minutes_is_stopped_and_not_started_again(
    tmp_path: Path,
) -> None:
    h = prestarting(tmp_path, stable_polls=10_000)  # its GPU never settles
    job, pid = settling_job(h)
    with capture_logs() as logs:
        h.tick(121.0)
        h.tick()
    assert not h.fake.process(pid).alive and len(h.fake.launches) == 1
    (stopped,) = [e for e in logs if e["event"] == "job_prestart_stopped"]
    assert stopped["reason"] == "waited 120 s for its GPU" and h.state(job) == "queued"
