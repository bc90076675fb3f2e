"""The daemon's tick with fake time, a file GPU source and scripted job processes (FakeRunner)."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from tests.conftest import Harness, gpu_entry, json_lines, worker_events


def test_job_waits_until_free_memory_is_stable(plain: Harness) -> None:
    """Below the threshold the job waits with a reason; it starts after stable_polls polls."""
    job = plain.submit("a")
    plain.tick()
    assert plain.state(job) == "queued"
    assert "need 20.0" in plain.job(job).reason
    plain.set_gpus([gpu_entry(0, 50)])
    plain.tick()
    plain.tick()
    assert plain.state(job) == "queued"
    assert "starts once it stays so for 3 polls" in plain.job(job).reason
    plain.tick()
    assert plain.state(job) == "running"
    assert plain.job(job).gpu_uuid == "GPU-sim-0"
    assert plain.settle(job) == "done"
    rec = plain.job(job)
    assert rec.peak_gib == 1.5 and rec.exit_class == "done"
    events = [e["event"] for e in json_lines(plain.settings.logs_dir / f"{job}.log")]
    assert events[0] == "job_started" and events[-1] == "job_finished"
    assert [e["event"] for e in worker_events(plain, job)] == ["start", "progress", "summary"]
    assert plain.runner.launches[0].env["CUDA_VISIBLE_DEVICES"] == "GPU-sim-0"


def test_reservation_prevents_double_booking(harness: Harness) -> None:
    """Two jobs that each fit, but not together, never start on the same free memory."""
    from gpuspool.estimate import need_gib

    harness.env["STUB_MODE"] = "sleep"
    free = need_gib(0.0, 600.0) * 1.5  # room for one job's need, not two
    harness.set_gpus([gpu_entry(0, free)])
    a = harness.submit("a", min_free_gib="auto", batch_seconds=600.0)
    b = harness.submit("b", min_free_gib="auto", batch_seconds=600.0)
    for _ in range(6):
        harness.tick()
    states = sorted([harness.state(a), harness.state(b)])
    assert states == ["queued", "running"]
    running = a if harness.state(a) == "running" else b
    waiting = b if running == a else a
    need = harness.job(running).need_gib
    assert need == need_gib(0.0, 600.0)
    assert "reserved" in harness.job(waiting).reason
    # The process now shows its memory in NVML: the reservation is released, free drops.
    pid = harness.job(running).pid
    used = [{"pid": pid, "used_mib": need * 1024}]
    harness.set_gpus([gpu_entry(0, free - need, processes=used)])
    for _ in range(4):
        harness.tick()
    assert harness.state(waiting) == "queued"
    assert harness.daemon.gpu_views()[0].reserved_gib == 0.0
    harness.daemon.stop_all(harness.now)
    harness.settle(running)


def test_oom_retries_with_backoff_then_fails(harness: Harness) -> None:
    """CUDA OOM defers the job with a growing delay; after max_attempts it fails."""
    job = harness.start("oom")
    assert harness.settle(job) == "deferred"
    rec = harness.job(job)
    assert rec.attempts == 1 and rec.not_before == rec.updated_at + 10.0
    harness.tick(5)
    assert harness.state(job) == "deferred" and "retry 2 of 3 after 10 s" in harness.job(job).reason
    harness.tick(6)
    assert harness.state(job) == "running"
    assert harness.settle(job) == "deferred"
    assert harness.job(job).not_before - harness.job(job).updated_at == 20.0
    harness.tick(25)
    assert harness.settle(job) == "failed"
    assert "CUDA out of memory" in harness.job(job).reason
    assert harness.job(job).attempts == 3


def test_bad_data_fails_without_retry(harness: Harness) -> None:
    """A data error is final and its reason (with the line number) is kept."""
    job = harness.start("data")
    assert harness.settle(job) == "failed"
    assert harness.job(job).reason == "line 3: audio file missing"
    assert harness.job(job).exit_class == "data_error"


def test_crash_is_retried(harness: Harness) -> None:
    """An unexpected worker crash is retried like a transient fault."""
    job = harness.start("crash")
    assert harness.settle(job) == "deferred"
    assert "worker crashed" in harness.job(job).reason


def test_cancel_stops_running_job(harness: Harness) -> None:
    """Cancelling a running job sends SIGTERM to its group and files it as cancelled."""
    job = harness.start("sleep")
    assert harness.state(job) == "running"
    harness.daemon.ledger.request_cancel(job, now=harness.now)
    assert harness.settle(job) == "cancelled"


def test_job_cancelled_during_a_start_never_runs(harness: Harness) -> None:
    """A job cancelled by another client while the daemon starts a different one stays
    cancelled, keeps its reason, and is never started when a GPU frees up later."""
    from gpuspool.ledger import Ledger

    harness.env["STUB_MODE"] = "sleep"
    harness.set_gpus([gpu_entry(0, 30)])
    k = harness.submit("k", min_free_gib=20)
    j = harness.submit("j", min_free_gib=60)
    other = Ledger(harness.settings.ledger_path)
    start = harness.daemon.runner.start

    def start_while_cancelling(launch: Any) -> Any:
        other.request_cancel(j, now=harness.now)  # the CLI cancels j meanwhile
        return start(launch)

    harness.daemon.runner.start = start_while_cancelling  # type: ignore[method-assign]
    for _ in range(3):
        harness.tick()
    harness.daemon.runner.start = start  # type: ignore[method-assign]
    assert harness.state(k) == "running" and harness.state(j) == "cancelled"
    harness.set_gpus([gpu_entry(0, 30), gpu_entry(1, 75)])
    for _ in range(4):
        harness.tick()
    assert harness.state(j) == "cancelled" and harness.job(j).pid is None
    assert "cancel" in harness.job(j).reason
    harness.daemon.stop_all(harness.now, hard=True)


def test_hung_job_times_out(harness: Harness) -> None:
    """A job running past its timeout is stopped and retried (or failed) with that reason."""
    job = harness.start("sleep", timeout_s=30.0, max_attempts=1)
    harness.tick(31)
    assert harness.settle(job) == "failed"
    assert "timed out after 30 s" in harness.job(job).reason


def test_restart_adopts_live_job_and_requeues_dead_one(harness: Harness) -> None:
    """After a daemon restart a live job is adopted (not rerun); a killed one resumes."""
    job = harness.start("sleep")
    pid = harness.job(job).pid
    harness.daemon = harness.new_daemon()  # a new daemon over the same ledger
    harness.tick()
    assert harness.state(job) == "running" and harness.job(job).pid == pid
    harness.runner.process(pid).exit(-signal.SIGKILL)
    harness.daemon = harness.new_daemon()
    assert harness.state(job) == "interrupted"
    for _ in range(3):
        harness.tick()
    assert harness.state(job) == "running" and harness.job(job).pid != pid
    harness.daemon.stop_all(harness.now)
    assert harness.settle(job) == "interrupted"


def test_bad_file_is_rejected_and_good_one_accepted(harness: Harness) -> None:
    """A malformed job file is quarantined with its reason; the next file is still accepted."""
    harness.drop_raw("bad.json", b'{"input": "relative.jsonl", "output": 3}')
    harness.drop_raw("worse.toml", b"\xff\xfe not utf-8")
    good = harness.submit("good")
    with capture_logs() as logs:
        report = harness.tick()
    assert report.accepted == [good]
    assert sorted(report.rejected) == ["bad.json", "worse.toml"]
    reasons = [p.read_text() for p in sorted(harness.daemon.spool.reason_files())]
    assert any("input: Value error, path must be absolute" in r for r in reasons)
    assert any("not UTF-8" in r for r in reasons)
    assert {e["event"] for e in logs} >= {"job_rejected", "job_accepted"}
    assert list(harness.settings.incoming_dir.iterdir()) == []
    assert (harness.settings.accepted_dir / f"{good}.json").exists()


def test_gpu_error_makes_gpu_not_free(harness: Harness) -> None:
    """A GPU reporting an error is never used and the job and log say why; it recovers."""
    harness.set_gpus([gpu_entry(0, 70, error="GPU is lost")])
    job = harness.submit("a")
    with capture_logs() as logs:
        for _ in range(4):
            harness.tick()
    assert harness.state(job) == "queued"
    assert "state unknown (GPU is lost)" in harness.job(job).reason
    assert next(e for e in logs if e["event"] == "gpu_error")["gpu_uuid"] == "GPU-sim-0"
    harness.set_gpus([gpu_entry(0, 70)])
    for _ in range(3):
        harness.tick()
    assert harness.state(job) == "running"
    assert harness.settle(job) == "done"


def test_unreadable_gpu_file_keeps_daemon_up(harness: Harness) -> None:
    """A probe error (like NVML init failing) leaves jobs waiting with the error as reason."""
    harness.gpu_file.write_text("not json")
    job = harness.submit("a")
    report = harness.tick()
    assert report.probe_error and "cannot read GPU file" in report.probe_error
    assert "no GPU readings" in harness.job(job).reason
    harness.set_gpus([gpu_entry(0, 70)])
    for _ in range(3):
        harness.tick()
    assert harness.state(job) == "running"
    harness.settle(job)
    assert json.loads(harness.job(job).spec.model_dump_json())["name"] == "a"


def test_output_completed_by_a_killed_run_counts_as_done(harness: Harness) -> None:
    """A worker killed after renaming its finished output into place, before saying so: the
    rerun finds the output (exit 73) and the job is done, not failed."""
    job = harness.start("sleep")
    pid = harness.job(job).pid
    Path(harness.job(job).output).write_text('{"audio": "a.wav", "audio_codes": []}\n')
    harness.env["STUB_MODE"] = "exists"  # what the rerun will find
    harness.runner.process(pid).exit(-signal.SIGKILL)
    assert harness.settle(job) in {"interrupted", "done"}
    for _ in range(3):
        harness.tick()
    assert harness.settle(job) == "done"
    states = [t["to_state"] for t in harness.daemon.ledger.transitions(job)]
    assert states.count("running") == 2 and "interrupted" in states


def test_output_existing_at_first_start_fails(harness: Harness) -> None:
    """On a job's first run, an output that appeared since intake is not taken as its own."""
    harness.env["STUB_MODE"] = "exists"
    harness.set_gpus([gpu_entry(0, 50)])
    job = harness.submit("a")
    harness.tick()
    Path(harness.job(job).output).write_text("someone else's file\n")
    for _ in range(2):
        harness.tick()
    assert harness.settle(job) == "failed"
    assert "exists" in harness.job(job).reason


def test_exception_starting_a_job_fails_it_once(plain: Harness) -> None:
    """Row 2: any exception from starting the process (here a ValueError, as Popen raises for a
    NUL byte) fails the job with its reason; it is not left running, nor started every tick."""
    plain.runner.start_error = ValueError("embedded null byte")
    job = plain.start("ok")
    assert plain.state(job) == "failed"
    assert plain.job(job).reason == "could not start the worker: ValueError: embedded null byte"
    assert plain.job(job).pid is None
    for _ in range(3):
        plain.tick()
    assert plain.state(job) == "failed" and plain.runner.launches == []
    assert plain.runner.removed_scratch == [plain.settings.scratch_dir / job]


def test_exception_preparing_a_job_fails_it(plain: Harness) -> None:
    """A job that cannot even be prepared (its user vanished, say) fails with the reason."""

    def no_user(uid: int) -> Any:
        raise KeyError(f"uid {uid} has no passwd entry")

    plain.set_gpus([gpu_entry(0, 50)])
    job = plain.submit("a")
    plain.tick()  # accepted
    plain.daemon.identity_for = no_user  # gone by the time a GPU is free
    plain.tick()
    plain.tick()
    assert plain.state(job) == "failed"
    assert "cannot start the job: KeyError" in plain.job(job).reason
    assert plain.runner.launches == []


def test_job_environment_is_an_allow_list(plain: Harness) -> None:
    """Row 14 at the tick: nothing of the daemon's environment but PATH and LANG reaches a job;
    job_env is added; the job id and GPU cannot be overridden by it."""
    plain.environ.update(GPUSPOOL_WEBHOOK_URL="http://x/?token=t", NOTIFY_SOCKET="/run/n")
    plain.env.update(HF_HOME="/srv/hf", CUDA_VISIBLE_DEVICES="all", GPUSPOOL_JOB_ID="forged")
    job = plain.start("ok")
    env = dict(plain.runner.launches[0].env)
    scratch = str(plain.settings.scratch_dir / job)
    assert env.pop("GPUSPOOL_JOB_ID") == job and env.pop("CUDA_VISIBLE_DEVICES") == "GPU-sim-0"
    assert env.pop("HF_HOME") == "/srv/hf" and env.pop("TMPDIR") == scratch
    assert set(env) <= {
        "PATH",
        "LANG",
        "HOME",
        "USER",
        "LOGNAME",
        "CUDA_DEVICE_ORDER",
        "PYTHONUNBUFFERED",
        "XDG_CACHE_HOME",
        "NUMBA_CACHE_DIR",
        "STUB_MODE",
    }
    assert plain.settle(job) == "done"
    assert plain.runner.removed_scratch == [plain.settings.scratch_dir / job]


def test_retry_keeps_the_scratch_folder_and_reads_only_the_new_run(harness: Harness) -> None:
    """A deferred job keeps its scratch folder; the rerun's events replace the first run's."""
    job = harness.start("oom")
    assert harness.settle(job) == "deferred" and harness.runner.removed_scratch == []
    harness.env["STUB_MODE"] = "ok"
    harness.tick(11)
    assert harness.settle(job) == "done"
    assert harness.job(job).peak_gib == 1.5 and harness.job(job).exit_class == "done"


def test_flooded_events_file_is_emptied_and_read_on(harness: Harness) -> None:
    """A worker flooding its events file (the daemon's disk) has it emptied once read; events
    it writes afterwards are still taken."""
    from gpuspool.daemon import MAX_EVENTS_FILE

    job = harness.start("sleep")
    proc = harness.runner.process(harness.job(job).pid)
    proc.write_events(b"junk\n" * (MAX_EVENTS_FILE // 5 + 1))
    harness.tick()
    assert harness.daemon.events_path(job).stat().st_size == 0
    proc.emit("progress", lines_done=3, lines_total=4)
    harness.tick()
    assert harness.job(job).progress == {"lines_done": 3, "lines_total": 4}
    harness.daemon.stop_all(harness.now)
    assert harness.settle(job) == "interrupted"
