"""The daemon's tick on a shared PostgreSQL ledger: hosts simulated as daemons in this process
(fake time, their own spool, state folder and GPU file, one database), real worker processes.

Host silence is measured on the database's clock, so these tests wait real time past a short
``host_timeout_s`` where a host must look dead."""
# ruff: noqa: E402 - the driver check runs before the imports that need the driver

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from tests.pgserver import PgServer, require_driver

require_driver()

import pytest
from structlog.testing import capture_logs

from gpuspool.ledger_pg import PgLedger
from tests.conftest import Harness, gpu_entry, wait_until

TIMEOUT_S = 0.6


def host(tmp: Path, url: str, name: str, **overrides: Any) -> Harness:
    folder = tmp / name
    folder.mkdir()
    overrides.setdefault("host_timeout_s", TIMEOUT_S)
    h = Harness(
        folder, ledger_url=url, host_name=name, poll_interval_s=0.1, stable_polls=1, **overrides
    )
    h.set_gpus([gpu_entry(0, 50)])
    return h


def audit(url: str, job_id: str) -> list[dict[str, Any]]:
    reader = PgLedger(url, host_name="reader", readonly=True)
    try:
        return reader.audit(job_id)
    finally:
        reader.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (killed, not yet reaped by its parent) is gone too.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_each_tick_heartbeats_the_hosts_gpus(tmp_path: Path, pg_url: str) -> None:
    a = host(tmp_path, pg_url, "a")
    a.tick()
    (row,) = a.daemon.ledger.hosts()  # type: ignore[attr-defined]
    assert row.name == "a" and row.version and row.draining is False
    assert [g["uuid"] for g in row.gpus] == ["GPU-sim-0"]
    a.daemon.ledger.set_draining(True)
    a.tick()
    assert a.daemon.ledger.hosts()[0].draining is True  # type: ignore[attr-defined]


def test_two_hosts_share_a_queue_and_never_start_a_job_twice(tmp_path: Path, pg_url: str) -> None:
    a, b = host(tmp_path, pg_url, "a"), host(tmp_path, pg_url, "b")
    jobs = [a.submit(f"a{i}") for i in range(4)] + [b.submit(f"b{i}") for i in range(4)]
    a.tick(), b.tick()

    def all_done() -> bool:
        a.tick(0.1), b.tick(0.1)
        return all(a.state(j) == "done" for j in jobs)

    wait_until(all_done, timeout=60, step=0.05)
    hosts = set()
    for job_id in jobs:
        trail = audit(pg_url, job_id)
        starts = [t for t in trail if t["to_state"] == "running"]
        assert len(starts) == 1, trail
        assert trail[-1]["host"] == starts[0]["host"]  # the owner filed the end
        hosts.add(starts[0]["host"])
        assert a.job(job_id).host == starts[0]["host"]
    assert hosts == {"a", "b"}  # each host placed on its own GPU


def test_hosts_allow_list(tmp_path: Path, pg_url: str) -> None:
    a, b = host(tmp_path, pg_url, "a"), host(tmp_path, pg_url, "b")
    job = a.submit("only-b", hosts=["b"])
    for _ in range(3):
        a.tick()
    assert a.state(job) == "queued"
    assert a.job(job).reason == "runs only on hosts b"
    b.tick()
    assert b.job(job).host == "b"
    assert b.settle(job) == "done"


def test_a_silent_hosts_job_moves_and_the_stale_worker_is_stopped(
    tmp_path: Path, pg_url: str
) -> None:
    a, b = host(tmp_path, pg_url, "a"), host(tmp_path, pg_url, "b")
    a.env["STUB_MODE"] = b.env["STUB_MODE"] = "sleep"
    job = a.submit("long")
    a.tick()
    b.tick()
    first = a.job(job)
    assert first.host == "a" and first.pid is not None
    time.sleep(TIMEOUT_S + 0.3)  # a says nothing: frozen, or cut off
    with capture_logs() as b_logs:
        b.tick()
    assert any(e["event"] == "jobs_requeued_from_silent_host" for e in b_logs)
    b.tick()
    now = b.job(job)
    assert now.host == "b" and now.fence == first.fence + 1 and now.pid != first.pid
    assert alive(first.pid)
    with capture_logs() as a_logs:
        a.tick()  # a wakes up: its worker is killed at once, and nothing is written
    assert next(e for e in a_logs if e["event"] == "job_fenced_out")["pid"] == first.pid
    wait_until(lambda: not alive(first.pid), timeout=10)
    assert alive(now.pid)
    a.tick()
    trail = audit(pg_url, job)
    assert [(t["to_state"], t["host"], t["fence"]) for t in trail] == [
        ("queued", "a", None),
        ("running", "a", first.fence),
        ("interrupted", "b", first.fence),
        ("running", "b", now.fence),
    ]
    assert b.job(job).pid == now.pid  # a's wake-up wrote nothing over b's attempt
    b.daemon.stop_all(b.now, hard=True)


def test_an_outage_keeps_running_jobs_and_starts_nothing(
    tmp_path: Path, pg_url: str, pg_server: PgServer
) -> None:
    a = host(tmp_path, pg_url, "a", host_timeout_s=30.0)  # the outage is shorter than half
    a.env["STUB_MODE"] = "sleep"
    job = a.submit("long")
    a.tick()
    pid = a.job(job).pid
    assert pid is not None
    a.set_gpus([gpu_entry(0, 25)])  # room for one job only
    second = a.submit("second")
    pg_server.down()
    try:
        with capture_logs() as logs:
            for _ in range(5):
                a.tick(1.0, settle_intake=False)
        assert [e["event"] for e in logs].count("ledger_unreachable") == 1
        assert alive(pid)
    finally:
        pg_server.up()
    with capture_logs() as logs:
        for _ in range(40):
            a.tick(1.0)
            if any(e["event"] == "ledger_reconnected" for e in logs):
                break
    assert [e["event"] for e in logs].count("ledger_reconnected") == 1
    assert a.job(job).pid == pid and a.state(job) == "running"
    a.tick()
    assert a.state(second) == "queued"  # taken in after the outage, no room for it
    a.set_gpus([gpu_entry(0, 50)])
    a.tick()
    assert a.state(second) == "running"
    trail = audit(pg_url, job)
    assert [t["to_state"] for t in trail] == ["queued", "running"]  # nothing lost, no rerun
    a.daemon.stop_all(a.now, hard=True)


def test_gpus_status_and_metrics_name_the_host(tmp_path: Path, pg_url: str) -> None:
    from prometheus_client import generate_latest

    from gpuspool import views
    from gpuspool.metrics import DaemonMetrics

    a, b = host(tmp_path, pg_url, "a"), host(tmp_path, pg_url, "b")
    a.env["STUB_MODE"] = b.env["STUB_MODE"] = "sleep"
    ja, jb = a.submit("on-a", hosts=["a"]), b.submit("on-b", hosts=["b"])
    a.tick(), b.tick()
    reader = PgLedger(pg_url, host_name="cli", readonly=True)
    snap = views.gpus_snapshot(reader)
    assert [(g["host"], g["index"]) for g in snap["gpus"]] == [("a", 0), ("b", 0)]
    assert [h["name"] for h in snap["hosts"]] == ["a", "b"]
    data = views.gpus_data(snap, reader.jobs(), 20.0, 1)
    lines = views.gpus_lines(data, time.time())
    assert [line.split("\t")[0] for line in lines[2:]] == ["a:0", "b:0"]
    assert [h["name"] for h in data["hosts"]] == ["a", "b"]  # what `gpus --json` prints
    assert not any(h["silent"] for h in data["hosts"])
    stale = views.gpus_data(snap, reader.jobs(), 20.0, 1, host_timeout_s=3600.0)
    assert not any(h["silent"] for h in stale["hosts"])
    stale = views.gpus_data(snap, reader.jobs(), 20.0, 1, host_timeout_s=-1.0)  # all past it
    assert [h["silent"] for h in stale["hosts"]] == [True, True]
    tail = views.gpus_lines(stale, time.time())[-2:]  # after the rows, as comments
    assert [line.split(":")[0] for line in tail] == ["# host a", "# host b"]
    status = views.status_data(reader, time.time())
    assert {j["id"]: j["host"] for j in status["jobs"]} == {ja: "a", jb: "b"}
    rows = views.status_lines(status)
    assert any(line.startswith(f"{ja}") and "\ta:0\t" in line for line in rows)
    reader.close()
    wait_until(lambda: a.tick(0.1) and b.tick(0.1) and a.job(ja).progress and b.job(jb).progress)
    m = DaemonMetrics(hostname="a")
    m.observe(a.daemon)
    text = generate_latest(m.registry).decode()
    assert 'gpuspool_host_info{host="a"} 1.0' in text
    assert f'job_id="{ja}"' in text and f'job_id="{jb}"' not in text  # b's job is b's to report
    a.daemon.stop_all(a.now, hard=True), b.daemon.stop_all(b.now, hard=True)


def test_a_host_cut_off_past_half_the_timeout_stops_its_workers(
    tmp_path: Path, pg_url: str, pg_server: PgServer
) -> None:
    """Cut off from the ledger, a host cannot tell an outage from a partition; the others take
    its jobs after ``host_timeout_s``, so it kills its workers after half of that."""
    a = host(tmp_path, pg_url, "a", host_timeout_s=4.0)
    a.env["STUB_MODE"] = "sleep"
    job = a.submit("long")
    a.tick()
    pid = a.job(job).pid
    pg_server.down()
    try:
        with capture_logs() as logs:
            a.tick(1.0, settle_intake=False)
            assert alive(pid)  # 1 s: under half the timeout
            a.tick(1.5, settle_intake=False)
        assert [e["event"] for e in logs].count("jobs_stopped_ledger_unreachable") == 1
        wait_until(lambda: not alive(pid), timeout=10)
    finally:
        pg_server.up()
    wait_until(lambda: a.tick(1.0) is not None and a.daemon.last_tick_done == a.now, timeout=30)
    a.tick()
    trail = audit(pg_url, job)
    assert [t["to_state"] for t in trail][:3] == ["queued", "running", "interrupted"]
    assert trail[2]["host"] == "a"  # still its own: filed by it, through its fence
    a.daemon.stop_all(a.now, hard=True)


def test_other_hosts_changes_do_not_rewrite_every_reason(tmp_path: Path, pg_url: str) -> None:
    """On a shared ledger the version moves at every other host's tick: a host writes only the
    waiting reasons that changed for it, not the whole queue each time."""
    a, b = host(tmp_path, pg_url, "a"), host(tmp_path, pg_url, "b")
    a.set_gpus([gpu_entry(0, 10)]), b.set_gpus([gpu_entry(0, 10)])  # nothing fits anywhere
    jobs = [a.submit(f"j{i}") for i in range(5)]
    a.tick(), b.tick(), a.tick()
    assert all(a.state(j) == "queued" for j in jobs)
    written: list[dict[str, str]] = []
    original = a.daemon.ledger.set_reasons

    def spy(reasons: dict[str, str], *, now: float, **kw: Any) -> None:
        written.append(dict(reasons))
        original(reasons, now=now, **kw)

    a.daemon.ledger.set_reasons = spy  # type: ignore[method-assign]
    late = b.submit("late")
    b.tick()  # b takes a job in: the shared version moves
    a.tick()
    assert [set(w) for w in written] == [{late}]


def test_a_restarted_daemon_kills_its_workers_whose_jobs_moved(tmp_path: Path, pg_url: str) -> None:
    """The daemon died and stayed down past host_timeout_s while its worker ran on; another
    host took the job. Back up, the daemon kills that worker before anything else."""
    a, b = host(tmp_path, pg_url, "a"), host(tmp_path, pg_url, "b")
    a.env["STUB_MODE"] = b.env["STUB_MODE"] = "sleep"
    job = a.submit("long")
    a.tick()
    b.tick()
    stale = a.job(job).pid
    time.sleep(TIMEOUT_S + 0.3)  # a's daemon is gone; its worker is not
    b.tick()
    b.tick()
    fresh = b.job(job)
    assert fresh.host == "b" and alive(stale)
    with capture_logs() as logs:
        a.daemon = a.new_daemon()
    assert next(e for e in logs if e["event"] == "job_fenced_out")["pid"] == stale
    wait_until(lambda: not alive(stale), timeout=10)
    assert alive(fresh.pid) and b.job(job).pid == fresh.pid
    b.daemon.stop_all(b.now, hard=True)


def test_logs_of_a_job_another_host_ran_name_that_host(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`gpuspool logs` on host a, for a job host b ran: the log is in b's state_dir, which a
    cannot read; the command says so and fails, instead of "no log yet" and exit 0."""
    from gpuspool.cli import main

    b = host(tmp_path, pg_url, "b")
    job = b.submit("on-b", hosts=["b"])
    wait_until(lambda: b.tick(0.1) and b.state(job) == "done", timeout=30, step=0.05)
    log = b.job(job).log_path
    assert log and Path(log).exists()
    started = [json.loads(x) for x in Path(log).read_text().splitlines() if "job_started" in x]
    assert started[0]["host"] == "b"  # each attempt's lines say where it ran
    Path(log).unlink()  # host a sees the shared folders, not b's state_dir
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'ledger_url = "{pg_url}"\nhost_name = "a"\nstate_dir = "{tmp_path / "sa"}"\n')
    capsys.readouterr()
    assert main(["--config", str(cfg), "logs", job]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"the log of {job} (state done) is on host b" in err and "this is host a" in err
    b.daemon.stop_all(b.now, hard=True)
