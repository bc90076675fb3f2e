"""Several hosts on one PostgreSQL: tick time, database round trips per tick, the wait from a GPU
freeing to its job starting (against one host on SQLite), and the idle daemons' load on the server.

    python bench/cluster_bench.py                # 3 hosts x 8 GPUs, 10,000 jobs (about 5 min)
    python bench/cluster_bench.py --queue 1000   # the same with a shorter queue

Each host is the daemon's real service (``service.Service``: the tick, the metrics, the status
snapshot), each with its own ``host_name``, state folder, spool and GPU file (``file:`` source),
all on one real PostgreSQL server started for the run (``tests/pgserver.py``) and the real
``PgLedger``. They are built in this process and ticked by one loop on their poll interval (the
hosts a third of an interval apart), so each tick can be timed and its database traffic counted:

- round trips: every call of ``psycopg.Connection.wait`` (each sends and waits for the server:
  a statement, a BEGIN, a COMMIT, a pipeline's sync);
- statements: every statement the client sends (``execute``, each row of an ``executemany``,
  BEGIN and COMMIT), checked against the server's own count (``pg_stat_statements``, calls in the
  bench's database).

Server CPU is the user + system time of the server's processes (``/proc/<pid>/stat``): the three
daemons' backends, and the whole server (postmaster and background workers). The jobs are the
fast stand-in worker (tests/stub_worker.py). Prints one JSON object per measurement, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

import psycopg  # noqa: E402
from tests.pgserver import PgServer, _server_user, find_bindir  # noqa: E402

from gpuspool import logs  # noqa: E402
from gpuspool.config import Settings  # noqa: E402
from gpuspool.gpus import write_gpu_file  # noqa: E402
from gpuspool.ledger import Ledger  # noqa: E402
from gpuspool.ledger_api import LedgerBackend  # noqa: E402
from gpuspool.ledger_pg import PgLedger  # noqa: E402
from gpuspool.models import JobSpec  # noqa: E402
from gpuspool.service import Service  # noqa: E402

STUB = str(ROOT / "tests" / "stub_worker.py")
GPUS = 8
THRESHOLD_GIB = 20.0
FULL_GIB = 10.0  # below the jobs' threshold: nothing starts
POLL_S = 1.0
STABLE_POLLS = 3


def emit(**fields: Any) -> dict[str, Any]:
    print(json.dumps(fields), flush=True)
    return fields


# -- counting the database traffic ------------------------------------------------------------


@dataclass
class Traffic:
    round_trips: int = 0
    statements: int = 0


TRAFFIC = Traffic()


def count_traffic() -> None:
    """Count every round trip and statement of every psycopg connection in this process."""
    wait, execute, executemany = (
        psycopg.Connection.wait,
        psycopg.Cursor.execute,
        psycopg.Cursor.executemany,
    )
    enter, leave = psycopg.Transaction.__enter__, psycopg.Transaction.__exit__

    def counted_wait(self: Any, *args: Any, **kwargs: Any) -> Any:
        TRAFFIC.round_trips += 1
        return wait(self, *args, **kwargs)

    def counted_execute(self: Any, *args: Any, **kwargs: Any) -> Any:
        TRAFFIC.statements += 1
        return execute(self, *args, **kwargs)

    def counted_executemany(self: Any, query: Any, params: Any, **kwargs: Any) -> Any:
        rows = list(params)
        TRAFFIC.statements += len(rows)
        return executemany(self, query, rows, **kwargs)

    def counted_enter(self: Any) -> Any:
        TRAFFIC.statements += 1  # BEGIN
        return enter(self)

    def counted_leave(self: Any, *args: Any) -> Any:
        TRAFFIC.statements += 1  # COMMIT or ROLLBACK
        return leave(self, *args)

    psycopg.Connection.wait = counted_wait  # type: ignore[method-assign]
    psycopg.Cursor.execute = counted_execute  # type: ignore[method-assign]
    psycopg.Cursor.executemany = counted_executemany  # type: ignore[method-assign]
    psycopg.Transaction.__enter__ = counted_enter  # type: ignore[method-assign]
    psycopg.Transaction.__exit__ = counted_leave  # type: ignore[method-assign]


# -- the server ---------------------------------------------------------------------------------


class Server:
    """The PostgreSQL server of the run, with ``pg_stat_statements`` loaded, and a way to read
    its processes' CPU time and its statement count."""

    def __init__(self) -> None:
        bindir = find_bindir()
        if bindir is None:
            sys.exit("no PostgreSQL server binaries (apt-get install postgresql)")
        self.pg = PgServer(bindir, _server_user())
        self.pg.start()
        self.pg.admin("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        self.pg.restart()
        self.monitor = psycopg.connect(self.pg.url("postgres"), autocommit=True)
        self.monitor.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        self.postmaster = int((self.pg.data / "postmaster.pid").read_text().split()[0])

    def database(self) -> str:
        return self.pg.create_database()

    def version(self) -> str:
        row = self.monitor.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "?"

    def backends(self) -> list[int]:
        rows = self.monitor.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'gpuspool@%'"
        ).fetchall()
        return [int(r[0]) for r in rows]

    def processes(self) -> list[int]:
        children = [
            int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == self.postmaster
        ]
        return [self.postmaster, *children]

    def reset_statements(self) -> None:
        self.monitor.execute("SELECT pg_stat_statements_reset()")

    def statements(self, url: str) -> list[tuple[str, int]]:
        """Each statement the bench's database ran since the last reset, with its calls."""
        rows = self.monitor.execute(
            "SELECT s.query, s.calls FROM pg_stat_statements s JOIN pg_database d"
            " ON d.oid = s.dbid WHERE d.datname = %s ORDER BY s.calls DESC",
            (url.rsplit("/", 1)[1],),
        ).fetchall()
        return [(" ".join(str(r[0]).split()), int(r[1])) for r in rows]

    def stop(self) -> None:
        self.monitor.close()
        self.pg.stop()


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of ``pids`` so far (gone processes count 0)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            pass
    return total / tick


# -- the hosts ---------------------------------------------------------------------------------


@dataclass
class Host:
    name: str
    folder: Path
    service: Service
    gpu_file: Path
    #: Per tick: the service's seconds, round trips, statements; the daemon tick's seconds.
    ticks: list[tuple[float, int, int, float]] = field(default_factory=list)
    _daemon_s: float = 0.0

    @property
    def ledger(self) -> LedgerBackend:
        assert self.service.daemon is not None
        return self.service.daemon.ledger

    def set_free(self, free_gib: list[float]) -> None:
        write_gpu_file(self.gpu_file, [_gpu(self.name, i, f) for i, f in enumerate(free_gib)])

    def tick(self) -> list[tuple[str, str]]:
        """One tick of the service (daemon tick, metrics, status snapshot), timed and counted."""
        trips, statements = TRAFFIC.round_trips, TRAFFIC.statements
        self._daemon_s = 0.0
        began = time.perf_counter()
        self.service.tick()
        took = time.perf_counter() - began
        self.ticks.append(
            (took, TRAFFIC.round_trips - trips, TRAFFIC.statements - statements, self._daemon_s)
        )
        assert self.service.daemon is not None
        return self.service.daemon.last_report.started

    def time_daemon_ticks(self) -> None:
        """Time ``Daemon.tick`` inside the service's tick (what ``gpuspool_tick_duration_seconds``
        measures: the metrics and the status snapshot come after it)."""
        daemon = self.service.daemon
        assert daemon is not None
        tick = daemon.tick

        def timed(now: float) -> Any:
            began = time.perf_counter()
            try:
                return tick(now)
            finally:
                self._daemon_s = time.perf_counter() - began

        daemon.tick = timed  # type: ignore[method-assign]

    def close(self) -> None:
        daemon = self.service.daemon
        if daemon is not None:
            daemon.stop_all(time.time(), hard=True)
        self.service.close()


def _gpu(host: str, index: int, free_gib: float) -> dict[str, Any]:
    return {"uuid": f"GPU-{host}-{index}", "name": "Simulated 80GB", "total_mib": 80 * 1024.0,
            "free_mib": free_gib * 1024}  # fmt: skip


def make_host(work: Path, name: str, ledger_url: str | None) -> Host:
    folder = work / name
    folder.mkdir(parents=True)
    gpu_file = folder / "gpus.json"
    write_gpu_file(gpu_file, [_gpu(name, i, FULL_GIB) for i in range(GPUS)])
    values: dict[str, Any] = {
        "spool_dir": folder / "spool",
        "state_dir": folder / "state",
        "scratch_dir": folder / "scratch",
        "gpu_source": f"file:{gpu_file}",
        "poll_interval_s": POLL_S,
        "stable_polls": STABLE_POLLS,
        "min_free_gib": THRESHOLD_GIB,
        "worker_command": [sys.executable, STUB],
        "worker_device": "cpu",
        "worker_extra_args": [],
        "allow_root_jobs": os.geteuid() == 0,
        "host_name": name,
        "host_timeout_s": 30.0,
        "metrics_address": "127.0.0.1:0",
        "progress_log_interval_s": 60.0,
    }
    if ledger_url is not None:
        values["ledger_url"] = ledger_url
    service = Service(Settings(**values), None)
    service.build()
    host = Host(name, folder, service, gpu_file)
    host.time_daemon_ticks()
    return host


def fill_queue(ledger: Any, work: Path, n: int) -> float:
    """Queue ``n`` jobs through the ledger's own ``add`` (one transaction each); returns jobs/s."""
    (work / "out").mkdir(parents=True)
    (work / "in.jsonl").write_text('{"audio": "a.wav"}\n')
    base = JobSpec.model_validate(
        {"input": str(work / "in.jsonl"), "output": str(work / "o.jsonl"), "tokenizer": "t"}
    )
    began = time.perf_counter()
    for i in range(n):
        spec = base.model_copy(update={"output": work / "out" / f"o{i}.jsonl"})
        ledger.add(job_id=f"{i:012x}", spec=spec, submitter_uid=os.geteuid(), need_gib=3.0,
                   threshold_gib=THRESHOLD_GIB, spool_file=None, now=time.time())  # fmt: skip
    return n / (time.perf_counter() - began)


# -- driving the hosts ----------------------------------------------------------------------------


def run_for(
    hosts: list[Host],
    seconds: float,
    before_tick: Callable[[Host], None] | None = None,
    until: Callable[[], bool] | None = None,
    event: tuple[float, Callable[[], None]] | None = None,
) -> None:
    """Tick each host every ``POLL_S``, the hosts a fraction of an interval apart, for
    ``seconds`` (or until ``until()``, asked after each tick); ``before_tick(host)`` runs before
    each of its ticks; ``event`` = (monotonic time, call) runs once, at that time."""
    start = time.monotonic()
    due = [start + POLL_S * k / len(hosts) for k in range(len(hosts))]
    while time.monotonic() - start < seconds:
        k = min(range(len(hosts)), key=lambda i: due[i])
        if event is not None and event[0] < due[k]:
            time.sleep(max(0.0, event[0] - time.monotonic()))
            event[1]()
            event = None
            continue
        time.sleep(max(0.0, due[k] - time.monotonic()))
        if before_tick is not None:
            before_tick(hosts[k])
        hosts[k].tick()
        due[k] += POLL_S
        if due[k] < time.monotonic():  # a tick overran: next one at once, as the scheduler does
            due[k] = time.monotonic()
        if until is not None and until():
            return


@contextmanager
def phase(hosts: list[Host], server: Server, url: str) -> Iterator[dict[str, Any]]:
    """Measure a phase: every host's ticks, the server's CPU and statements over its wall time."""
    for h in hosts:
        h.ticks.clear()
    out: dict[str, Any] = {}
    backends = server.backends()
    processes = server.processes()
    cpu_backends, cpu_server = cpu_s(backends), cpu_s(processes)
    server.reset_statements()
    began = time.monotonic()
    yield out
    wall = time.monotonic() - began
    ticks = [t for h in hosts for t in h.ticks]
    seconds = sorted(t[0] * 1000 for t in ticks)
    trips = [t[1] for t in ticks]
    statements = [t[2] for t in ticks]
    daemon_ms = sorted(t[3] * 1000 for t in ticks)
    by_query = server.statements(url)
    out.update(
        ticks=len(ticks),
        tick_ms_median=round(statistics.median(seconds), 1),
        tick_ms_p99=round(_p99(seconds), 1),
        tick_ms_max=round(seconds[-1], 1),
        daemon_tick_ms_median=round(statistics.median(daemon_ms), 1),
        daemon_tick_ms_p99=round(_p99(daemon_ms), 1),
        per_host_tick_ms_median_p99={
            h.name: _median_p99([t[0] * 1000 for t in h.ticks]) for h in hosts
        },
        round_trips_per_tick_median=statistics.median(trips),
        round_trips_per_tick_max=max(trips),
        statements_per_tick_median=statistics.median(statements),
        statements_per_tick_max=max(statements),
        client_statements_per_s=round(sum(statements) / wall, 1),
        server_statements_per_s=round(sum(n for _, n in by_query) / wall, 1),
        server_cpu_backends_pct_of_core=round((cpu_s(backends) - cpu_backends) / wall * 100, 2),
        server_cpu_all_pct_of_core=round((cpu_s(processes) - cpu_server) / wall * 100, 2),
        seconds=round(wall, 1),
        server_statements_per_tick_by_query={
            q[:100]: round(n / len(ticks), 2) for q, n in by_query[:12]
        },
    )


def _median_p99(values: list[float]) -> list[float]:
    ordered = sorted(values)
    return [round(statistics.median(ordered), 1), round(_p99(ordered), 1)]


def _p99(sorted_values: list[float]) -> float:
    """The 99th percentile (nearest rank)."""
    return sorted_values[min(len(sorted_values) - 1, int(0.99 * len(sorted_values)))]


def churn_below(rng: random.Random) -> Callable[[Host], None]:
    """Before each tick, every GPU of the host shows a new free amount, all below the need."""
    return lambda h: h.set_free([rng.uniform(2.0, THRESHOLD_GIB - 1) for _ in range(GPUS)])


def churn_above(rng: random.Random) -> Callable[[Host], None]:
    """Before each tick, every GPU of the host shows a new free amount, all above the need."""
    return lambda h: h.set_free([rng.uniform(THRESHOLD_GIB + 10, 79.0) for _ in range(GPUS)])


def start_latency(hosts: list[Host], rounds: int, rng: random.Random) -> list[float]:
    """Seconds from one GPU's memory freeing (its file rewritten at a random moment of a poll
    interval) to the process of a waiting job starting on it (the process's creation time)."""
    latencies = []
    for _ in range(rounds):
        for h in hosts:
            h.set_free([FULL_GIB] * GPUS)
        run_for(hosts, POLL_S * 1.5)
        host = rng.choice(hosts)
        index = rng.randrange(GPUS)
        gpu = _gpu(host.name, index, 0)["uuid"]
        freed: list[tuple[float, int]] = []  # when, and the host's tick count then
        found: list[str] = []

        def free(host: Host = host, index: int = index, freed: Any = freed) -> None:
            host.set_free([79.0 if i == index else FULL_GIB for i in range(GPUS)])
            freed.append((time.time(), len(host.ticks)))

        def started(
            host: Host = host, gpu: str = gpu, freed: Any = freed, found: Any = found
        ) -> bool:
            if not freed or len(host.ticks) <= freed[0][1]:
                return False
            assert host.service.daemon is not None
            found.extend(j for j, uuid in host.service.daemon.last_report.started if uuid == gpu)
            return bool(found)

        at = time.monotonic() + rng.uniform(0, POLL_S)
        run_for(hosts, 20 * POLL_S, until=started, event=(at, free))
        assert found, "the freed GPU's job never started"
        job = host.ledger.get(found[0])
        assert job is not None and job.pid_start is not None
        latencies.append(job.pid_start - freed[0][0])
        host.set_free([FULL_GIB] * GPUS)
        run_for(hosts, POLL_S)  # the started job ends
    return latencies


def latency_row(label: str, latencies: list[float]) -> dict[str, Any]:
    return emit(
        measure="gpu_free_to_start",
        ledger=label,
        rounds=len(latencies),
        designed_wait_s=f"{(STABLE_POLLS - 1) * POLL_S:g} to {STABLE_POLLS * POLL_S:g}"
        f" ({STABLE_POLLS} stable polls at {POLL_S:g} s, the first may come at once)",
        latency_s=[round(x, 3) for x in latencies],
        latency_s_median=round(statistics.median(latencies), 3),
        latency_s_max=round(max(latencies), 3),
    )


# -- the run ----------------------------------------------------------------------------------


def hosts_on(work: Path, names: list[str], url: str | None) -> list[Host]:
    hosts = [make_host(work, name, url) for name in names]
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the services took it; Ctrl-C stops
    return hosts


def close(hosts: list[Host]) -> None:
    for h in hosts:
        h.close()


def pg_run(server: Server, work: Path, a: argparse.Namespace, rng: random.Random) -> list[Any]:
    rows: list[Any] = []
    names = ["a", "b", "c"]
    # The idle load: three daemons, nothing queued, nothing running.
    idle_url = server.database()
    hosts = hosts_on(work / "idle", names, idle_url)
    run_for(hosts, 3 * POLL_S)
    with phase(hosts, server, idle_url) as idle:
        run_for(hosts, a.idle_seconds)
    rows.append(emit(measure="idle", ledger="postgresql", hosts=3, gpus_per_host=GPUS,
                     queued=0, poll_interval_s=POLL_S, **idle))  # fmt: skip
    close(hosts)
    # 10,000 queued jobs.
    url = server.database()
    submitter = PgLedger(url, host_name="submitter")
    rate = fill_queue(submitter, work / "jobs", a.queue)
    submitter.close()
    emit(measure="queue_filled", ledger="postgresql", jobs=a.queue, adds_per_s=round(rate))
    hosts = hosts_on(work / "pg", names, url)
    run_for(hosts, 3 * POLL_S)
    for label, churn in waiting_phases(rng):
        with phase(hosts, server, url) as row:
            run_for(hosts, a.phase_seconds, before_tick=churn)
        rows.append(emit(measure="ticks", ledger="postgresql", hosts=3, queued=a.queue,
                         phase=label, **row))  # fmt: skip
    rows.append(latency_row("postgresql, 3 hosts", start_latency(hosts, a.rounds, rng)))
    done_before = submitter_counts(url).get("done", 0)
    with phase(hosts, server, url) as row:
        run_for(hosts, a.phase_seconds, before_tick=churn_above(rng))
    done = submitter_counts(url).get("done", 0) - done_before
    rows.append(emit(measure="ticks", ledger="postgresql", hosts=3, queued=a.queue,
                     phase="queue moving: every GPU free, jobs start and end", jobs_done=done,
                     **row))  # fmt: skip
    close(hosts)
    return rows


def waiting_phases(rng: random.Random) -> list[tuple[str, Callable[[Host], None] | None]]:
    """Nothing can start: the GPUs' memory steady, then churning (below the need)."""
    return [
        ("waiting, GPU memory steady", None),
        ("waiting, GPU memory churning below the need", churn_below(rng)),
    ]


def submitter_counts(url: str) -> dict[str, int]:
    ledger = PgLedger(url, host_name="reader", readonly=True)
    try:
        return ledger.counts()
    finally:
        ledger.close()


def sqlite_run(work: Path, a: argparse.Namespace, rng: random.Random) -> list[Any]:
    rows: list[Any] = []
    (host,) = hosts_on(work / "sqlite", ["solo"], None)
    ledger = Ledger(host.service.settings.ledger_path)
    fill_queue(ledger, work / "sqlite-jobs", a.queue)
    ledger.close()
    run_for([host], 3 * POLL_S)
    for label, churn in waiting_phases(rng):
        host.ticks.clear()
        run_for([host], a.phase_seconds, before_tick=churn)
        ms = sorted(t[0] * 1000 for t in host.ticks)
        daemon_ms = sorted(t[3] * 1000 for t in host.ticks)
        rows.append(emit(measure="ticks", ledger="sqlite", hosts=1, queued=a.queue, phase=label,
                         ticks=len(ms), tick_ms_median=round(statistics.median(ms), 1),
                         tick_ms_p99=round(_p99(ms), 1), tick_ms_max=round(ms[-1], 1),
                         daemon_tick_ms_median=round(statistics.median(daemon_ms), 1),
                         daemon_tick_ms_p99=round(_p99(daemon_ms), 1)))  # fmt: skip
    rows.append(latency_row("sqlite, 1 host", start_latency([host], a.rounds, rng)))
    close([host])
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The summary: one line per measurement."""
    out = [
        "",
        "| measurement | ledger | tick ms median / p99: service (daemon) | round trips per tick"
        " median (max) | statements per tick median (max) | statements/s client / server |"
        " server CPU % of a core: backends / all |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["measure"] in ("idle", "ticks"):
            what = "idle, nothing queued" if r["measure"] == "idle" else r["phase"]
            trips = stmts = rate = cpu = "–"
            if "round_trips_per_tick_median" in r:
                trips = f"{r['round_trips_per_tick_median']:g} ({r['round_trips_per_tick_max']})"
                stmts = f"{r['statements_per_tick_median']:g} ({r['statements_per_tick_max']})"
                rate = f"{r['client_statements_per_s']:g} / {r['server_statements_per_s']:g}"
                cpu = (f"{r['server_cpu_backends_pct_of_core']:g} /"
                       f" {r['server_cpu_all_pct_of_core']:g}")  # fmt: skip
            out.append(f"| {what} ({r['queued']} queued) | {r['ledger']}, {r['hosts']} host(s) |"
                       f" {r['tick_ms_median']:g} / {r['tick_ms_p99']:g}"
                       f" ({r['daemon_tick_ms_median']:g} / {r['daemon_tick_ms_p99']:g}) |"
                       f" {trips} | {stmts} |"
                       f" {rate} | {cpu} |")  # fmt: skip
    out += ["", "| GPU freed → its job's process started | median | max | each |",
            "|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if r["measure"] == "gpu_free_to_start":
            out.append(f"| {r['ledger']} | {r['latency_s_median']:g} s | {r['latency_s_max']:g} s"
                       f" | {', '.join(f'{x:g}' for x in r['latency_s'])} |")  # fmt: skip
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--queue", type=int, default=10_000, help="jobs queued (default 10,000)")
    ap.add_argument("--phase-seconds", type=float, default=15.0, help="each tick phase's length")
    ap.add_argument("--idle-seconds", type=float, default=30.0, help="the idle phase's length")
    ap.add_argument("--rounds", type=int, default=5, help="GPU-free-to-start rounds per ledger")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (the daemons' log)")
    a = ap.parse_args()
    rng = random.Random(7)
    work = Path(tempfile.mkdtemp(prefix="gpuspool-cluster-bench-"))
    os.chmod(work, 0o755)
    log = open(work / "daemons.log", "w")  # noqa: SIM115 - the services log here until the end
    logs.configure("json", "info", stream=log)
    count_traffic()
    server = Server()
    try:
        emit(measure="host", cpus=os.cpu_count(), python=sys.version.split()[0],
             postgresql=server.version(), load_avg_1m=round(os.getloadavg()[0], 2),
             poll_interval_s=POLL_S, stable_polls=STABLE_POLLS, gpus_per_host=GPUS)  # fmt: skip
        rows = pg_run(server, work, a, rng) + sqlite_run(work, a, rng)
    finally:
        server.stop()
        log.close()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    emit(measure="end", load_avg_1m=round(os.getloadavg()[0], 2))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
