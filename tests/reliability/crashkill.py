"""Crash-kill: SIGKILL the real daemon (and its workers) across the job lifecycle, then check.

One ``CrashKill`` run starts the real daemon (``killpoint_daemon.py``) over and over on one spool
and ledger. Each cycle submits a few jobs and then, chosen by a seeded RNG, either lets the daemon
SIGKILL itself at a named point (``KILL_POINTS``: intake, placement, start, finish), SIGKILLs it
from outside at a random moment, SIGKILLs a running worker's process group, or both. A last
clean run lets every job finish; then ``verify`` checks the promises:

* lost jobs: a valid submitted file that is not in the ledger, or not in ``accepted/``, or a job
  that did not end in a terminal state (or queued);
* duplicated runs: two live process sessions carrying the same ``GPUSPOOL_JOB_ID`` at one sample
  of the process table (sampled every ~20 ms all along), more sessions seen for a job than claims
  of it in the transitions table, or more ``job_started`` events than claims;
* corrupted outputs: an output that differs byte for byte from an uninterrupted run's (the stub's
  pure function of the input, or the real worker's reference output);
* the audit trail: every job's transitions chain (each ``from`` is the previous ``to``) and end in
  exactly one terminal transition.

The same code runs the CI version (few cycles) and the long one
(``bench/reliability_crashkill.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpuspool.gpus import write_gpu_file
from gpuspool.ledger import JobRecord, Ledger
from gpuspool.models import TERMINAL_STATES, JobState
from gpuspool.runner import JOB_ID_ENV
from gpuspool.spool import Spool
from tests.reliability.fault_worker import expected_output
from tests.reliability.killpoint_daemon import KILL_POINTS

HERE = Path(__file__).resolve().parent
FAULT_WORKER = HERE / "fault_worker.py"
KILLPOINT_DAEMON = HERE / "killpoint_daemon.py"
REPO = HERE.parents[1]
#: Arguments the daemon appends to every worker (the real one uses them; stubs ignore them).
WORKER_EXTRA = ["--progress-interval-s", "0.2", "--cpu-threads", "1", "--loader-workers", "1"]
BATCH_SECONDS = 12.0
_ENV_KEY = (JOB_ID_ENV + "=").encode()


def daemon_config(workdir: Path, **extra: Any) -> dict[str, Any]:
    """A config for the real daemon on ``workdir`` (simulated GPUs, the fault worker)."""
    values: dict[str, Any] = {
        "spool_dir": str(workdir / "spool"),
        "state_dir": str(workdir / "state"),
        "scratch_dir": str(workdir / "scratch"),
        "gpu_source": f"file:{workdir / 'gpus.json'}",
        "poll_interval_s": 0.2,
        "stable_polls": 1,
        "min_free_gib": 1.0,
        "worker_command": [sys.executable, str(FAULT_WORKER)],
        "worker_device": "cpu",
        "stop_grace_s": 5.0,
        "progress_log_interval_s": 0.0,
        "default_batch_seconds": BATCH_SECONDS,
        "log_format": "json",
        "worker_extra_args": WORKER_EXTRA,
        "allow_root_jobs": os.geteuid() == 0,
        "max_attempts": 100,
        "retry_backoff_s": 0.2,
    }
    values.update(extra)
    return values


def open_reader(path: Path, url: str | None = None) -> Any:
    """The daemon's ledger, read-only: the SQLite file at ``path``, or the PostgreSQL ``url``."""
    if url is None:
        return Ledger(path, readonly=True)
    from gpuspool.ledger_pg import PgLedger

    return PgLedger(url, host_name="crashkill-reader", readonly=True)


def read_ledger(
    path: Path, url: str | None = None
) -> tuple[dict[str, JobRecord], dict[str, list[dict[str, Any]]]]:
    """Every job in the ledger by id, and each job's transitions, oldest first."""
    ledger = open_reader(path, url)
    try:
        jobs = {j.id: j for j in ledger.jobs()}
        trail: dict[str, list[dict[str, Any]]] = {}
        for t in ledger.transitions():
            trail.setdefault(t["job_id"], []).append(t)
    finally:
        ledger.close()
    return jobs, trail


def write_config(path: Path, values: dict[str, Any]) -> None:
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))


def reference_run(input_path: Path, tokenizer: Path, out: Path) -> bytes:
    """The real worker's output for one uninterrupted run, with the daemon's argv."""
    subprocess.run(
        [sys.executable, "-m", "gpuspool.extract", "--input", str(input_path), "--output",
         str(out), "--tokenizer", str(tokenizer), "--device", "cpu", "--batch-seconds",
         f"{BATCH_SECONDS:g}", "--on-bad-line", "fail", "--dtype", "fp32", *WORKER_EXTRA],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return out.read_bytes()


# -- the process-table sampler ---------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, session id, start time in ticks) of ``pid``, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    rest = raw[raw.rfind(b")") + 2 :].split()
    return rest[0].decode(), int(rest[3]), int(rest[19])


def _job_of(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read()
    except OSError:
        return None
    for item in env.split(b"\0"):
        if item.startswith(_ENV_KEY):
            return item[len(_ENV_KEY) :].decode()
    return None


class ProcSampler(threading.Thread):
    """Samples the process table for ``GPUSPOOL_JOB_ID``: sessions per job, overlaps."""

    def __init__(self, interval_s: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.sessions: dict[str, set[int]] = {}
        self.overlaps: list[tuple[float, str, list[int]]] = []
        self.samples = 0
        self._known: dict[tuple[int, int], str | None] = {}
        self._first_seen: dict[tuple[int, int], float] = {}
        self._halt = threading.Event()

    def sample(self) -> dict[str, set[int]]:
        """One pass: job id → live (non-zombie) session ids carrying it."""
        now = time.monotonic()
        live: dict[str, set[int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            st = _stat(pid)
            if st is None or st[0] in ("Z", "X"):
                continue
            key = (pid, st[2])
            job = self._known.get(key)
            if key not in self._known:
                job = _job_of(pid)
                first = self._first_seen.setdefault(key, now)
                # A process may not have exec'd its job environment yet: look again for 1 s.
                if job is not None or now - first > 1.0:
                    self._known[key] = job
            if job is not None:
                live.setdefault(job, set()).add(st[1])
        self.samples += 1
        for job, sids in live.items():
            self.sessions.setdefault(job, set()).update(sids)
            if len(sids) > 1:
                self.overlaps.append((time.time(), job, sorted(sids)))
        return live

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval_s)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


# -- the run -------------------------------------------------------------------------------------


@dataclass
class Report:
    """The figures of one crash-kill run."""

    seed: int
    cycles: int = 0
    daemon_kills: int = 0
    worker_kills: int = 0
    kill_points: Counter[str] = field(default_factory=Counter)
    phases: Counter[str] = field(default_factory=Counter)
    jobs: int = 0
    real_jobs: int = 0
    invalid_files: int = 0
    restarts: int = 0
    lost_jobs: int = 0
    duplicated_runs: int = 0
    corrupted_outputs: int = 0
    not_done: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def kills(self) -> int:
        return self.daemon_kills + self.worker_kills

    def summary(self) -> str:
        lines = [
            f"seed {self.seed}: {self.cycles} cycles in {self.elapsed_s:.0f} s,"
            f" {self.restarts} daemon starts",
            f"kills injected: {self.kills} ({self.daemon_kills} daemon SIGKILL,"
            f" {self.worker_kills} worker SIGKILL)",
            "daemon kills by lifecycle point: "
            + ", ".join(f"{k} {v}" for k, v in sorted(self.phases.items())),
            f"jobs: {self.jobs} ({self.real_jobs} with the real worker),"
            f" {self.invalid_files} invalid files",
            f"process-table samples: {self.samples}",
            f"lost jobs: {self.lost_jobs}; duplicated runs: {self.duplicated_runs};"
            f" corrupted outputs: {self.corrupted_outputs}; not done: {self.not_done}",
        ]
        lines += [f"PROBLEM: {p}" for p in self.problems]
        return "\n".join(lines)


@dataclass
class _Job:
    job_id: str
    output: Path
    expected: bytes


class CrashKill:
    """One seeded crash-kill run on ``workdir`` (see the module docstring)."""

    ACTIONS = ("kill_point", "daemon_random", "worker_random", "daemon_and_workers")

    def __init__(
        self,
        workdir: Path,
        *,
        seed: int,
        cycles: int,
        real_fraction: float = 0.0,
        tokenizer: Path | None = None,
        real_input: Path | None = None,
        real_reference: bytes | None = None,
        real_cycles: frozenset[int] = frozenset(),
        plan: list[tuple[str, str | None]] | None = None,
        log: Any = None,
        ledger_url: str | None = None,
    ) -> None:
        self.workdir = workdir
        #: A PostgreSQL ledger's URL; None: the SQLite file in the state folder.
        self.ledger_url = ledger_url
        self.rng = random.Random(seed)
        #: Which live worker to kill depends on timing: its own RNG keeps ``rng``'s plan fixed.
        self.victim_rng = random.Random(seed + 1)
        self.cycles = cycles
        self.real_fraction = real_fraction if tokenizer is not None else 0.0
        self.tokenizer = tokenizer
        self.real_input = real_input
        self.real_reference = real_reference
        self.real_cycles = real_cycles if tokenizer is not None else frozenset()
        #: Fixed (action, kill point) per cycle instead of random ones.
        self.plan = plan
        self.report = Report(seed)
        self.jobs: list[_Job] = []
        self.invalid: list[str] = []
        self.log = log or (lambda msg: None)
        self.spool = Spool(workdir / "spool")
        self.data = workdir / "data"
        self.out = workdir / "out"
        self.daemon_log = workdir / "daemon.log"
        self.config = workdir / "gpuspool.toml"
        self.ledger_path = workdir / "state" / "ledger.sqlite3"
        self.proc: subprocess.Popen[bytes] | None = None
        self.sampler = ProcSampler()

    # -- helpers -------------------------------------------------------------------------------

    def _start_daemon(self, kill_point: str | None) -> None:
        log = open(self.daemon_log, "ab")  # noqa: SIM115 - the child keeps it
        env = {k: v for k, v in os.environ.items() if k != JOB_ID_ENV}
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        self._log_size = self.daemon_log.stat().st_size if self.daemon_log.exists() else 0
        self.proc = subprocess.Popen(
            [sys.executable, str(KILLPOINT_DAEMON), str(self.config), kill_point or ""],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.workdir,
        )
        log.close()
        self.report.restarts += 1

    def _started(self) -> bool:
        with open(self.daemon_log, "rb") as f:
            f.seek(self._log_size)
            return b'"daemon_started"' in f.read()

    def _wait_started(self, timeout: float = 30.0) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if self._started():
                return True
            time.sleep(0.02)
        raise AssertionError("daemon did not start")

    def _kill_daemon(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.report.phases[self._phase()] += 1
            self.proc.send_signal(signal.SIGKILL)
            self.report.daemon_kills += 1
        self.proc.wait(timeout=10)
        if self.proc.returncode not in (-signal.SIGKILL, 0):
            self.report.problems.append(f"daemon exited on its own with {self.proc.returncode}")

    def _phase(self) -> str:
        """Where in the lifecycle a random daemon kill lands (as seen from outside)."""
        if self.spool.pending():
            return "random:intake"
        live = self.sampler.sample()
        if live:
            return "random:mid-extraction"
        return "random:idle/placement"

    def _kill_workers(self, how_many: int) -> int:
        live = self.sampler.sample()
        victims = self.victim_rng.sample(sorted(live), min(how_many, len(live)))
        for job in victims:
            for sid in live[job]:
                try:
                    os.killpg(sid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                self.report.worker_kills += 1
        return len(victims)

    def _submit(self, cycle: int) -> None:
        for i in range(self.rng.randint(1, 3)):
            n = self.rng.randint(3, 25)
            inp = self.data / f"c{cycle}-{i}.jsonl"
            inp.write_text(
                "".join(json.dumps({"audio": f"a{cycle}-{i}-{k}.wav", "k": k}) + "\n"
                        for k in range(n))
            )  # fmt: skip
            delay = self.rng.choice([0.01, 0.03, 0.08])
            self._submit_one(f"c{cycle}-{i}", inp, f"stub:ok:{delay}", expected_output(inp))
        if self.rng.random() < self.real_fraction or cycle in self.real_cycles:
            assert self.real_input is not None and self.real_reference is not None
            self.report.real_jobs += 1
            self._submit_one(f"c{cycle}-real", self.real_input, str(self.tokenizer),
                             self.real_reference)  # fmt: skip
        if self.rng.random() < 0.2:
            name = f"bad-c{cycle}.json"
            tmp = self.spool.staging / name
            tmp.write_text(self.rng.choice(['{"input": 3}', "{not json", '{"input": "/x"}']))
            os.rename(tmp, self.spool.incoming / name)
            self.invalid.append(name)

    def _submit_one(self, name: str, inp: Path, tokenizer: str, expected: bytes) -> None:
        out = self.out / f"{name}.jsonl"
        _, job_id = self.spool.submit(
            {"input": str(inp), "output": str(out), "tokenizer": tokenizer, "name": name},
            stem=name,
        )
        self.jobs.append(_Job(job_id, out, expected))

    # -- the run -------------------------------------------------------------------------------

    def setup(self) -> None:
        for d in (self.data, self.out):
            d.mkdir(parents=True, exist_ok=True)
        self.spool.ensure_dirs()
        gpus = [
            {"uuid": f"GPU-ck-{i}", "name": "sim", "total_mib": 81920, "free_mib": 81920}
            for i in range(4)
        ]
        write_gpu_file(self.workdir / "gpus.json", gpus)
        extra = {} if self.ledger_url is None else {"ledger_url": self.ledger_url}
        write_config(self.config, daemon_config(self.workdir, **extra))

    def run(self) -> Report:
        t0 = time.monotonic()
        self.setup()
        self.sampler.start()
        try:
            for cycle in range(self.cycles):
                self._cycle(cycle)
                self.report.cycles += 1
            self._drain()
        finally:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.sampler.stop()
            self._kill_leftovers()
        self.report.samples = self.sampler.samples
        self.verify()
        self.report.elapsed_s = time.monotonic() - t0
        return self.report

    def _cycle(self, cycle: int) -> None:
        if self.plan is not None:
            action, point = self.plan[cycle]
        else:
            action = self.rng.choice(self.ACTIONS)
            point = self.rng.choice(sorted(KILL_POINTS)) if action == "kill_point" else None
        self._start_daemon(point)
        started = self._wait_started()
        self._submit(cycle)
        self.log(f"cycle {cycle}: {action} {point or ''}")
        if action == "kill_point":
            assert self.proc is not None and point is not None
            try:
                self.proc.wait(timeout=6.0 if started else 0.1)
            except subprocess.TimeoutExpired:
                self._kill_daemon()  # the point was not reached this cycle: a random kill
            else:
                self.report.kill_points[point] += 1
                self.report.phases[f"point:{point}"] += 1
                self.report.daemon_kills += 1
                if self.proc.returncode != -signal.SIGKILL:
                    self.report.problems.append(f"daemon exited with {self.proc.returncode}")
        elif action == "daemon_random":
            time.sleep(self.rng.uniform(0.0, 2.5))
            self._kill_daemon()
        elif action == "worker_random":
            time.sleep(self.rng.uniform(0.1, 2.0))
            self._kill_workers(self.rng.randint(1, 2))
            time.sleep(self.rng.uniform(0.0, 1.0))
            self._kill_daemon()
        else:
            time.sleep(self.rng.uniform(0.1, 2.5))
            self._kill_daemon()
            self._kill_workers(99)

    def _drain(self, timeout: float = 600.0) -> None:
        """A last run without kills: every job finishes; then a clean SIGTERM stop."""
        self._start_daemon(None)
        self._wait_started()
        deadline = time.monotonic() + timeout
        ids = {j.job_id for j in self.jobs}
        while time.monotonic() < deadline:
            if not self.spool.pending() and self._all_terminal(ids):
                break
            time.sleep(0.2)
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        if code != 0:
            self.report.problems.append(f"daemon's clean stop exited {code}")

    def _all_terminal(self, ids: set[str]) -> bool:
        if self.ledger_url is None and not self.ledger_path.exists():
            return False
        ledger = open_reader(self.ledger_path, self.ledger_url)
        try:
            states = {j.id: j.state for j in ledger.jobs()}
        finally:
            ledger.close()
        return all(states.get(i) in TERMINAL_STATES for i in ids)

    def _kill_leftovers(self) -> None:
        """Report and kill this run's job processes still alive after the stop (only this
        run's: other daemons on the machine may have jobs of their own)."""
        ours = {j.job_id for j in self.jobs}
        live = {job: sids for job, sids in self.sampler.sample().items() if job in ours}
        for job, sids in live.items():
            self.report.problems.append(f"job {job}: process left running after the stop")
            for sid in sids:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(sid, signal.SIGKILL)

    # -- the checks ----------------------------------------------------------------------------

    def verify(self) -> None:
        r = self.report
        r.jobs = len(self.jobs)
        r.invalid_files = len(self.invalid)
        records, transitions = read_ledger(self.ledger_path, self.ledger_url)
        accepted = {p.name.split(".")[0] for p in self.spool.accepted.iterdir()}
        starts: Counter[str] = Counter()
        for line in self.daemon_log.read_bytes().splitlines():
            if line.startswith(b"{") and b'"job_started"' in line:
                starts[json.loads(line)["job_id"]] += 1
        submitted = {j.job_id for j in self.jobs}
        for extra in set(records) - submitted:
            r.problems.append(f"ledger has a job nobody submitted: {extra}")
        if self.spool.pending():
            r.problems.append(f"entries left in incoming/: {self.spool.pending()}")
        reasons = "".join(p.read_text() for p in self.spool.reason_files())
        for name in self.invalid:
            if f"file: {name}\n" not in reasons:
                r.lost_jobs += 1
                r.problems.append(f"invalid file {name} has no reason in rejected/")
        for job in self.jobs:
            rec = records.get(job.job_id)
            if rec is None or job.job_id not in accepted:
                r.lost_jobs += 1
                r.problems.append(
                    f"job {job.job_id}: in ledger {rec is not None},"
                    f" in accepted/ {job.job_id in accepted}"
                )
                continue
            if rec.state not in TERMINAL_STATES and rec.state != JobState.QUEUED:
                r.lost_jobs += 1
                r.problems.append(f"job {job.job_id} stuck in {rec.state.value}")
            if rec.state != JobState.DONE:
                r.not_done += 1
                r.problems.append(f"job {job.job_id} ended {rec.state.value}: {rec.reason}")
            r.duplicated_runs += self._check_runs(job.job_id, transitions.get(job.job_id, []),
                                                  starts[job.job_id])  # fmt: skip
            if rec.state == JobState.DONE:
                got = job.output.read_bytes() if job.output.exists() else None
                if got != job.expected:
                    r.corrupted_outputs += 1
                    r.problems.append(f"job {job.job_id}: output differs from an uninterrupted run")
                leftovers = list(job.output.parent.glob(job.output.name + ".partial*"))
                if leftovers:
                    r.problems.append(f"job {job.job_id}: done but left {leftovers}")
        ours = {j.job_id for j in self.jobs}
        overlaps = [o for o in self.sampler.overlaps if o[1] in ours]
        r.duplicated_runs += len({job for _, job, _ in overlaps})
        for at, job, sids in overlaps[:10]:
            r.problems.append(f"job {job}: sessions {sids} alive together at {at:.3f}")

    def _check_runs(self, job_id: str, trail: list[dict[str, Any]], started_events: int) -> int:
        """The audit trail of one job; returns how many runs it had beyond its claims."""
        r = self.report
        prev: str | None = None
        for t in trail:
            if t["from_state"] != prev:
                r.problems.append(
                    f"job {job_id}: transition {t['from_state']}→{t['to_state']} after {prev}"
                )
            prev = t["to_state"]
        terminal = [t for t in trail if JobState(t["to_state"]) in TERMINAL_STATES]
        if len(terminal) > 1 or (terminal and trail[-1] is not terminal[-1]):
            r.problems.append(f"job {job_id}: {len(terminal)} terminal transitions")
        claims = sum(1 for t in trail if t["to_state"] == JobState.RUNNING.value)
        sessions = len(self.sampler.sessions.get(job_id, ()))
        extra = max(0, sessions - claims) + max(0, started_events - claims)
        if extra:
            r.problems.append(
                f"job {job_id}: {sessions} sessions, {started_events} job_started, {claims} claims"
            )
        return extra
