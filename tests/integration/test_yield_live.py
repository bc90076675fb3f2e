"""Polite scavenging with the real daemon, the real worker (tiny model, CPU) and a ``file:`` GPU
source: another user's real process appears on the job's GPU, the job yields, waits again and
resumes elsewhere with an output identical to an uninterrupted run's; ``yield = false`` keeps
running."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import gpu_entry, wait_until
from tests.integration.conftest import TEST_USER, LiveDaemon, ensure_test_user

POLL_S = 0.5
STABLE_POLLS = 2
GRACE_S = 10.0


@pytest.fixture
def stranger() -> Iterator[subprocess.Popen[bytes]]:
    """A real process of another user (``sleep``, as the test user): what the daemon must
    name by its uid."""
    user = ensure_test_user()
    proc = subprocess.Popen(
        ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
         "sleep", "600"],
    )  # fmt: skip
    yield proc
    proc.kill()
    proc.wait()


def yielding_daemon(tmp_path: Path) -> LiveDaemon:
    return LiveDaemon(
        tmp_path, yield_on_foreign_process=True, yield_cooldown_s=300.0, poll_interval_s=POLL_S,
        stable_polls=STABLE_POLLS, stop_grace_s=GRACE_S, metrics_address="127.0.0.1:0",
    )  # fmt: skip


def mid_run(live: LiveDaemon, job: str) -> None:
    """Wait until the worker has written its first lines (and still runs)."""
    wait_until(lambda: live.job(job) and live.job(job).progress.get("lines_done", 0) > 0, 120)
    assert live.state(job) == "running"


def test_job_yields_to_another_users_process_and_resumes_on_another_gpu(
    tmp_path: Path,
    tokenizer_dir: Path,
    audio_input: Path,
    reference_output: bytes,
    stranger: subprocess.Popen[bytes],
) -> None:
    live = yielding_daemon(tmp_path)
    live.set_gpus(gpu_entry(0, 50), gpu_entry(1, 10))
    live.start()
    job = live.submit(audio_input, tokenizer_dir)
    mid_run(live, job)
    assert live.job(job).gpu_uuid == "GPU-sim-0"
    appeared = time.time()
    foreign = [{"pid": stranger.pid, "used_mib": 8192}]
    live.set_gpus(gpu_entry(0, 42, processes=foreign), gpu_entry(1, 50))
    # Filed as yielded and started again on GPU 1 in one tick: watch the yield count.
    wait_until(lambda: live.job(job).yields, STABLE_POLLS * POLL_S + GRACE_S + 30, 0.05)
    stopped_in = time.time() - appeared
    rec = live.job(job)
    assert rec.yields == 1 and rec.attempts == 0, rec
    assert (rec.last_yield["pid"], rec.last_yield["user"]) == (stranger.pid, TEST_USER)
    # stable_polls polls (+ one for the poll in progress when the process appeared) and the
    # grace, with room for a loaded machine: the worker checkpoints within one batch.
    assert stopped_in <= (STABLE_POLLS + 1) * POLL_S + GRACE_S + 5, stopped_in
    wait_until(lambda: live.job(job).state.value == "running" and live.job(job).pid, 30)
    assert live.job(job).gpu_uuid == "GPU-sim-1"  # the other GPU, at once
    trail = audit(live, job)
    back = next(i for i, t in enumerate(trail) if t["from_state"] == "running")
    assert trail[back]["to_state"] == "queued" and trail[back + 1]["to_state"] == "running"
    assert float(trail[back + 1]["at"]) - float(trail[back]["at"]) < 2 * POLL_S  # type: ignore[arg-type]
    shown = subprocess.run(
        [*live_cli(live), "status", "--json"], capture_output=True, text=True, timeout=60,
        check=True,
    ).stdout  # fmt: skip
    (row,) = [r for r in json.loads(shown)["jobs"] if r["id"] == job]
    assert row["yielded"].startswith(f"yielded to pid {stranger.pid} (user {TEST_USER}) on GPU 0")
    text = scrape(live)
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check.stdout
    assert metric(text, "gpuspool_jobs_yielded_total") == 1
    events = [e for e in live.events() if e.get("job_id") == job]
    (yielded,) = [e for e in events if e["event"] == "job_yielded"]
    assert yielded["pid"] == stranger.pid and yielded["user"] == TEST_USER
    assert str(trail[back]["detail"]).startswith(
        f"yielded to pid {stranger.pid} (user {TEST_USER}) on GPU 0"
    )
    live.finishes_identically(job, reference_output)
    print(f"\nyield: foreign process seen → worker gone and job queued in {stopped_in:.2f} s")


def test_yield_false_keeps_running(
    tmp_path: Path,
    tokenizer_dir: Path,
    audio_input: Path,
    reference_output: bytes,
    stranger: subprocess.Popen[bytes],
) -> None:
    live = yielding_daemon(tmp_path)
    live.set_gpus(gpu_entry(0, 50))
    live.start()
    job = live.submit(audio_input, tokenizer_dir, **{"yield": False})
    mid_run(live, job)
    pid = live.job(job).pid
    live.set_gpus(gpu_entry(0, 42, processes=[{"pid": stranger.pid, "used_mib": 8192}]))
    time.sleep((STABLE_POLLS + 2) * POLL_S)
    rec = live.job(job)
    assert rec.state.value in ("running", "done") and rec.yields == 0
    assert not [e for e in live.events() if e["event"] in ("job_stopping", "job_yielded")]
    assert all(e["pid"] == pid for e in live.events() if e["event"] == "job_started")
    live.finishes_identically(job, reference_output)


def live_cli(live: LiveDaemon) -> list[str]:
    import sys

    return [sys.executable, "-m", "gpuspool.cli", "--config", str(live.config)]


def audit(live: LiveDaemon, job: str) -> list[dict[str, object]]:
    from gpuspool.ledger import Ledger

    ledger = Ledger(live.ledger_path, readonly=True)
    try:
        return ledger.transitions(job)
    finally:
        ledger.close()


def scrape(live: LiveDaemon) -> str:
    url = wait_until(
        lambda: next((e["url"] for e in live.events() if e["event"] == "metrics_serving"), None)
    )
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def metric(text: str, name: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return float(sample.value)
    return None
