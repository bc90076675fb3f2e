"""Load: the real daemon with N queued jobs and 8 simulated GPUs churning, for a while.

``LoadRun`` submits N job files at once (``stub:ok`` jobs of the fault worker, ~0.5 s each),
starts the real daemon on 8 simulated GPUs whose free memory a thread rewrites every second
(each GPU fits one job at a time, sometimes none), samples the daemon's RSS every few seconds,
then stops it with SIGTERM and checks the ledger:

* lost jobs: a submitted job not in the ledger;
* lost transitions: a job whose transitions do not chain (a ``from`` that is not the previous
  ``to``), or whose state is not its last transition's ``to``; ``job_started`` /
  ``job_finished`` events in the log that differ from the transitions into running / done;
* jobs left running after the stop; done jobs without their output;
* RSS: the daemon's resident memory in the first and the last sampled minute.
"""

from __future__ import annotations

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

import psutil

from gpuspool.gpus import write_gpu_file
from gpuspool.models import JobState
from gpuspool.spool import Spool
from tests.reliability.crashkill import REPO, daemon_config, read_ledger, write_config

GIB = 1024.0


@dataclass
class LoadReport:
    jobs: int
    gpus: int
    duration_s: float = 0.0
    intake_s: float | None = None
    done: int = 0
    started: int = 0
    transitions: int = 0
    states: Counter[str] = field(default_factory=Counter)
    lost_jobs: int = 0
    lost_transitions: int = 0
    left_running: int = 0
    missing_outputs: int = 0
    rss_mib: list[tuple[float, float]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def rss_window(self, first: bool, span_s: float = 60.0) -> float:
        """Median RSS (MiB) over the first or the last ``span_s`` of samples after intake."""
        start = self.intake_s or 0.0
        samples = [(t, r) for t, r in self.rss_mib if t >= start]
        if not samples:
            return float("nan")
        edge = samples[0][0] + span_s if first else samples[-1][0] - span_s
        window = sorted(r for t, r in samples if (t <= edge if first else t >= edge))
        return window[len(window) // 2]

    def summary(self) -> str:
        first, last = self.rss_window(True), self.rss_window(False)
        peak = max((r for _, r in self.rss_mib), default=float("nan"))
        lines = [
            f"{self.jobs} jobs queued, {self.gpus} simulated GPUs churning, "
            f"{self.duration_s:.0f} s of daemon run",
            f"intake of all {self.jobs} files: {self.intake_s:.1f} s" if self.intake_s else "",
            f"jobs started {self.started}, done {self.done}; transitions {self.transitions};"
            f" states at the end {dict(sorted(self.states.items()))}",
            f"daemon RSS: first minute median {first:.1f} MiB, last minute median {last:.1f}"
            f" MiB, peak {peak:.1f} MiB ({len(self.rss_mib)} samples)",
            f"lost jobs: {self.lost_jobs}; lost transitions: {self.lost_transitions};"
            f" left running: {self.left_running}; done without output: {self.missing_outputs}",
        ]
        lines += [f"PROBLEM: {p}" for p in self.problems[:30]]
        return "\n".join(x for x in lines if x)


class LoadRun:
    def __init__(self, workdir: Path, *, jobs: int, duration_s: float, seed: int = 1) -> None:
        self.workdir = workdir
        self.n = jobs
        self.duration_s = duration_s
        self.rng = random.Random(seed)
        self.report = LoadReport(jobs, 8)
        self.spool = Spool(workdir / "spool")
        self.gpu_file = workdir / "gpus.json"
        self.ledger_path = workdir / "state" / "ledger.sqlite3"
        self.daemon_log = workdir / "daemon.log"
        self._halt = threading.Event()

    def _gpus(self) -> list[dict[str, Any]]:
        # 21 GiB free fits one 20 GiB job (its reservation then leaves < 20); sometimes a GPU is
        # busy with "someone else" (5 GiB free) or shows a little more.
        return [
            {"uuid": f"GPU-load-{i}", "name": "sim", "total_mib": 80 * GIB,
             "free_mib": self.rng.choice([21.0, 21.0, 21.0, 23.0, 5.0]) * GIB}
            for i in range(8)
        ]  # fmt: skip

    def _churn(self) -> None:
        while not self._halt.wait(1.0):
            write_gpu_file(self.gpu_file, self._gpus())

    def setup(self) -> list[str]:
        self.spool.ensure_dirs()
        (self.workdir / "out").mkdir(exist_ok=True)
        inp = self.workdir / "in.jsonl"
        inp.write_text("".join(json.dumps({"audio": f"a{k}.wav"}) + "\n" for k in range(3)))
        write_gpu_file(self.gpu_file, self._gpus())
        write_config(
            self.workdir / "gpuspool.toml",
            daemon_config(self.workdir, poll_interval_s=0.5, min_free_gib=20.0,
                          max_attempts=3, stop_grace_s=10.0),
        )  # fmt: skip
        ids = []
        for i in range(self.n):
            _, job_id = self.spool.submit(
                {"input": str(inp), "output": str(self.workdir / "out" / f"{i}.jsonl"),
                 "tokenizer": "stub:ok:0.15", "name": f"load-{i}"},
                stem=f"load-{i}",
            )  # fmt: skip
            ids.append(job_id)
        return ids

    def run(self) -> LoadReport:
        ids = self.setup()
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        with open(self.daemon_log, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gpuspool.cli", "--config",
                 str(self.workdir / "gpuspool.toml"), "daemon"],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir,
            )  # fmt: skip
        churn = threading.Thread(target=self._churn, daemon=True)
        churn.start()
        t0 = time.monotonic()
        ps = psutil.Process(proc.pid)
        try:
            while time.monotonic() - t0 < self.duration_s:
                if proc.poll() is not None:
                    self.report.problems.append(f"daemon exited by itself: {proc.returncode}")
                    break
                t = time.monotonic() - t0
                self.report.rss_mib.append((t, ps.memory_info().rss / 2**20))
                if self.report.intake_s is None and not self.spool.pending():
                    self.report.intake_s = t
                time.sleep(2.0)
        finally:
            self._halt.set()
            churn.join()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=120)
        self.report.duration_s = time.monotonic() - t0
        if code != 0:
            self.report.problems.append(f"daemon's SIGTERM stop exited {code}")
        self.verify(ids)
        return self.report

    def verify(self, ids: list[str]) -> None:
        r = self.report
        jobs, trail = read_ledger(self.ledger_path)
        r.transitions = sum(len(v) for v in trail.values())
        events: Counter[tuple[str, str]] = Counter()
        for line in self.daemon_log.read_bytes().splitlines():
            if line.startswith(b"{") and (b'"job_started"' in line or b'"job_finished"' in line):
                e = json.loads(line)
                events[(e["event"], e["job_id"])] += 1
        for job_id in ids:
            job = jobs.get(job_id)
            if job is None:
                r.lost_jobs += 1
                r.problems.append(f"job {job_id} not in the ledger")
                continue
            r.states[job.state.value] += 1
            prev = None
            for t in trail.get(job_id, []):
                if t["from_state"] != prev:
                    r.lost_transitions += 1
                    r.problems.append(
                        f"job {job_id}: {t['from_state']}→{t['to_state']} after {prev}"
                    )
                prev = t["to_state"]
            if prev != job.state.value:
                r.lost_transitions += 1
                r.problems.append(f"job {job_id}: state {job.state.value}, last transition {prev}")
            runs = sum(1 for t in trail.get(job_id, []) if t["to_state"] == "running")
            dones = sum(1 for t in trail.get(job_id, []) if t["to_state"] == "done")
            r.started += runs
            r.done += dones
            if events[("job_started", job_id)] != runs or events[("job_finished", job_id)] != dones:
                r.lost_transitions += 1
                r.problems.append(
                    f"job {job_id}: {events[('job_started', job_id)]} job_started for {runs} runs,"
                    f" {events[('job_finished', job_id)]} job_finished for {dones} done"
                )
            if job.state == JobState.RUNNING:
                r.left_running += 1
            if job.state == JobState.DONE and not Path(str(job.spec.output)).exists():
                r.missing_outputs += 1
