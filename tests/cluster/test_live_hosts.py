"""Several hosts as separate real ``gpuspool daemon`` processes on one PostgreSQL database, each
with its own ``host_name``, GPU file, spool and state folder: the whole queue done once, a host
killed, a host frozen (SIGSTOP) past ``host_timeout_s`` and woken up."""
# ruff: noqa: E402 - the driver check runs before the imports that need the driver

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.pgserver import PgServer, require_driver

require_driver()

import pytest

from gpuspool.ledger_pg import PgLedger
from tests.cluster.test_live_pg import PgLiveDaemon
from tests.conftest import STUB_WORKER, gpu_entry, wait_until

HOST_TIMEOUT_S = 2.0


class Cluster:
    def __init__(
        self, tmp: Path, url: str, names: list[str], gpus: int, mode: str, timeout_s: float
    ) -> None:
        self.url = url
        self.data = tmp / "shared"  # the filesystem every host sees
        self.data.mkdir()
        (self.data / "in.jsonl").write_text('{"audio": "a.wav"}\n')
        self.hosts: dict[str, PgLiveDaemon] = {}
        for name in names:
            folder = tmp / name
            folder.mkdir()
            d = PgLiveDaemon(
                folder, url, host_name=name, worker_command=[sys.executable, STUB_WORKER],
                worker_extra_args=[], poll_interval_s=0.2, stable_polls=1,
                host_timeout_s=timeout_s, stop_grace_s=2.0,
            )  # fmt: skip
            with d.config.open("a") as f:  # a table comes after the plain keys
                f.write(f'\n[job_env]\nSTUB_MODE = "{mode}"\n')
            d.set_gpus(*(gpu_entry(i, 50) for i in range(gpus)))
            d.spool.ensure_dirs()
            self.hosts[name] = d
        PgLedger(url, host_name="observer").close()  # the schema, before the hosts start
        self.ledger = PgLedger(url, host_name="observer", readonly=True)

    def start(self) -> None:
        for d in self.hosts.values():
            d.start(wait=False)
        for d in self.hosts.values():
            wait_until(lambda d=d: "daemon_started" in d.log_path.read_text(), timeout=30)

    def submit(self, host: str, name: str) -> str:
        d = self.hosts[host]
        data = {"input": str(self.data / "in.jsonl"), "output": str(self.data / f"{name}.jsonl"),
                "tokenizer": "tiny", "name": name}  # fmt: skip
        return d.spool.submit(data, stem=name)[1]

    def states(self, jobs: list[str]) -> dict[str, str]:
        rows = {j.id: j.state.value for j in self.ledger.jobs()}
        return {j: rows.get(j, "unknown") for j in jobs}

    def all_done(self, jobs: list[str]) -> bool:
        return set(self.states(jobs).values()) == {"done"}

    def workers(self, host: str) -> list[int]:
        return [
            j.pid
            for j in self.ledger.jobs()
            if j.host == host and j.pid and j.state.value == "running"
        ]

    def close(self) -> None:
        for d in self.hosts.values():
            if d.proc is not None and d.proc.poll() is None:
                d.proc.send_signal(signal.SIGCONT)
                d.proc.kill()
                d.proc.wait()
        self.ledger.close()


@pytest.fixture
def cluster_factory(tmp_path: Path, pg_url: str) -> Iterator[Any]:
    made: list[Cluster] = []

    def make(names: list[str], gpus: int, mode: str, timeout_s: float = HOST_TIMEOUT_S) -> Cluster:
        c = Cluster(tmp_path, pg_url, names, gpus, mode, timeout_s)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def starts(ledger: PgLedger, job_id: str) -> list[dict[str, Any]]:
    return [t for t in ledger.audit(job_id) if t["to_state"] == "running"]


def test_three_hosts_run_a_hundred_jobs_each_once(cluster_factory: Any) -> None:
    c = cluster_factory(["a", "b", "c"], gpus=3, mode="ok")
    jobs = [c.submit("abc"[i % 3], f"j{i}") for i in range(99)]
    c.start()
    wait_until(lambda: c.all_done(jobs), timeout=120, step=0.2)
    used = set()
    for job_id in jobs:
        (start,) = starts(c.ledger, job_id)  # 0 double starts
        used.add(start["host"])
        assert c.ledger.get(job_id).host == start["host"]
    assert used == {"a", "b", "c"}
    for d in c.hosts.values():
        assert d.stop() == 0


@pytest.mark.xfail(
    strict=False,
    reason="on the 2-core CI machine host a sometimes holds no running job within 60 s (cause "
    "not found yet); tests/cluster/test_host_killed_real_worker.py checks the same guarantee "
    "with the real worker",
)
def test_a_killed_hosts_jobs_finish_on_the_others(cluster_factory: Any) -> None:
    c = cluster_factory(["a", "b", "c"], gpus=2, mode="slow")
    jobs = [c.submit("abc"[i % 3], f"j{i}") for i in range(12)]
    for d in c.hosts.values():  # 5 s a job: b and c cannot run the queue out before a fills up
        with d.config.open("a") as f:
            f.write('STUB_STEPS = "100"\n')
    c.start()
    # Every job in the shared ledger first: a file still in a's own spool would wait for a (each
    # host takes in its own spool), and this test is about a's running jobs moving on.
    wait_until(lambda: all(c.ledger.get(j) is not None for j in jobs), timeout=60, step=0.05)
    wait_until(lambda: len(c.workers("a")) >= 1, timeout=60, step=0.05)
    c.hosts["a"].kill9()
    # Read after the kill: a job a finished just before it is no victim (a loaded machine
    # leaves time for that between a look and the kill).
    victims = {j.id for j in c.ledger.jobs() if j.host == "a" and j.state.value == "running"}
    assert victims, "a ran nothing when it died"
    for pid in c.workers("a"):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    wait_until(lambda: c.all_done(jobs), timeout=120, step=0.2)
    for job_id in victims:
        trail = c.ledger.audit(job_id)
        assert [t["to_state"] for t in trail][-3:] == ["interrupted", "running", "done"]
        assert trail[-1]["host"] in {"b", "c"}
    for job_id in jobs:
        assert json.loads((c.data / f"{c.ledger.get(job_id).name}.jsonl").read_text())["audio"]
    for name in ("b", "c"):
        assert c.hosts[name].stop() == 0


def test_a_frozen_host_wakes_up_fenced_out(cluster_factory: Any) -> None:
    c = cluster_factory(["a", "b"], gpus=1, mode="slow")
    (job,) = [c.submit("a", "long")]
    with c.hosts["b"].config.open("a") as f:
        f.write('STUB_STEPS = "60"\n')
    with c.hosts["a"].config.open("a") as f:
        f.write('STUB_STEPS = "400"\n')
    c.hosts["a"].start()
    wait_until(lambda: c.workers("a"), timeout=30, step=0.05)
    (stale,) = c.workers("a")
    daemon_a = c.hosts["a"].proc
    assert daemon_a is not None
    daemon_a.send_signal(signal.SIGSTOP)
    os.killpg(stale, signal.SIGSTOP)
    c.hosts["b"].start()
    wait_until(lambda: c.workers("b"), timeout=30, step=0.05)  # b took the job over
    (fresh,) = c.workers("b")
    os.killpg(stale, signal.SIGCONT)
    daemon_a.send_signal(signal.SIGCONT)
    wait_until(lambda: not _alive(stale), timeout=10, step=0.05)  # a stopped its worker
    wait_until(lambda: c.all_done([job]), timeout=30, step=0.1)
    lines = (c.data / "long.jsonl").read_text().splitlines()
    assert [json.loads(line)["pid"] for line in lines] == [fresh]  # b's worker wrote it, once
    trail = c.ledger.audit(job)
    assert [(t["to_state"], t["host"]) for t in trail] == [
        ("queued", "a"), ("running", "a"), ("interrupted", "b"), ("running", "b"), ("done", "b"),
    ]  # fmt: skip
    fences = [t["fence"] for t in trail if t["to_state"] == "running"]
    assert len(set(fences)) == 2  # one owner per attempt
    events = c.hosts["a"].events()
    assert any(e["event"] == "job_fenced_out" and e["pid"] == stale for e in events)
    for d in c.hosts.values():
        assert d.stop() == 0


def test_postgresql_restarting_mid_run_loses_nothing(
    cluster_factory: Any, pg_server: PgServer
) -> None:
    """The restart is far shorter than half ``host_timeout_s``: the workers keep running, the
    daemons log the outage once and its end once, every job runs once."""
    c = cluster_factory(["a", "b"], gpus=2, mode="slow", timeout_s=20.0)
    jobs = [c.submit("ab"[i % 2], f"j{i}") for i in range(10)]
    c.start()
    # Workers on both hosts (each GPU takes a second job a poll later: no exact count to wait for).
    wait_until(lambda: min(len(c.workers("a")), len(c.workers("b"))) >= 2, timeout=30, step=0.05)
    pg_server.restart()
    c.ledger.ping()  # this test's own reader reconnects too
    wait_until(lambda: c.all_done(jobs), timeout=60, step=0.2)
    for job_id in jobs:
        assert len(starts(c.ledger, job_id)) == 1
    for d in c.hosts.values():
        names = [e["event"] for e in d.events()]
        assert names.count("ledger_unreachable") <= 1
        assert names.count("ledger_reconnected") == names.count("ledger_unreachable")
        assert "tick_failed" not in names
        assert d.stop() == 0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
