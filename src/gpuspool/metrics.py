"""Prometheus metrics: what the daemon sees and does, served over HTTP on loopback only.

GPU memory is ``gpuspool_gpu_{free,used,total}_mib``, and, with ``metrics_dcgm_names`` on (off
by default: a real dcgm-exporter often runs beside it, and its ``modelName`` label is not the
snake case promtool wants), also under dcgm-exporter's names and labels (``DCGM_FI_DEV_FB_FREE``
etc., MiB, ``gpu``/``UUID``/``device``/``modelName``/``Hostname``) so its dashboards work here.
Gauges are a snapshot taken at the end of each tick (``observe``); counters and histograms are
fed from the ledger's ``transitions`` table, so a change made by the CLI (a cancel) counts too.
The exposition passes ``promtool check metrics``: no ``*_created`` series, labelled counters
start at zero, units end the names. Imported only when ``metrics_address`` is set; must not
import torch.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from gpuspool import __version__
from gpuspool.models import RUNNABLE_STATES, JobState

if TYPE_CHECKING:
    from gpuspool.daemon import Daemon

#: Job waits and runs last seconds to days.
TIME_BUCKETS_S = (1, 10, 30, 60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400, 172800)
#: A tick takes milliseconds; one near ``poll_interval_s`` or above is worth seeing.
TICK_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
#: ``UUID`` as dcgm-exporter spells it, so series join with its; ``model_name`` in snake case
#: (promtool's rule; only the DCGM-named copies keep dcgm-exporter's ``modelName``).
GPU_LABELS = ("gpu", "UUID", "model_name")
#: dcgm-exporter's labels; its Grafana dashboard selects on ``Hostname`` and ``gpu``.
DCGM_LABELS = ("gpu", "UUID", "device", "modelName", "Hostname")
#: The memory gauges per GPU, and what each means.
GPU_MEMORY = (("free", "free"), ("used", "used: total - free"), ("total", "total"))
#: Final states, the ``outcome`` of ``gpuspool_jobs_finished_total``.
FINISH_OUTCOMES = (JobState.DONE.value, JobState.FAILED.value, JobState.CANCELLED.value)
#: How a run ended, the ``outcome`` of ``gpuspool_job_duration_seconds``.
RUN_OUTCOMES = (*FINISH_OUTCOMES, "retry", JobState.INTERRUPTED.value, "yielded")
JOB_LABELS = ("job_id", "name", "UUID")
#: A run's ``outcome`` label by the state it ended in, where the two differ.
_RUN_OUTCOME = {JobState.DEFERRED.value: "retry", JobState.QUEUED.value: "yielded"}


class MetricsAddressError(ValueError):
    """``metrics_address`` is malformed or not a loopback address."""


def parse_loopback(address: str) -> tuple[str, int]:
    """``"127.0.0.1:9404"``, ``"[::1]:9404"`` or ``"localhost:9404"`` → (host, port).

    Anything that is not loopback is refused: the endpoint has no authentication, and job names
    and paths are in its labels.
    """
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise MetricsAddressError(
            f"metrics_address must be HOST:PORT on loopback, e.g. 127.0.0.1:9404; got {address!r}"
        )
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError as exc:
        raise MetricsAddressError(
            f"metrics_address host must be a loopback IP (127.0.0.1 or ::1); got {host!r}"
        ) from exc
    if not ip.is_loopback:
        raise MetricsAddressError(
            f"metrics_address {address!r} is not loopback; the metrics endpoint only binds to"
            " 127.0.0.1 or ::1 (put a reverse proxy in front to expose it)"
        )
    return host, int(port_text)


@dataclass(frozen=True)
class _Snapshot:
    """Gauge values as of one tick (replaced whole, so a scrape never sees half a tick)."""

    gpus: list[dict[str, Any]] = field(default_factory=list)
    states: dict[str, int] = field(default_factory=dict)
    jobs: list[dict[str, Any]] = field(default_factory=list)
    last_tick: float | None = None
    draining: bool = False
    #: (user, running, waiting) per submitter; empty with ``metrics_user_labels`` off.
    users: list[tuple[str, int, int]] = field(default_factory=list)


def _gauge(name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


class _SnapshotCollector(Collector):
    def __init__(self, dcgm_names: bool, hostname: str) -> None:
        self.snapshot = _Snapshot()
        self.dcgm_names = dcgm_names
        self.hostname = hostname

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        yield from self._gpu_memory(snap)
        healthy = _gauge(
            "gpuspool_gpu_healthy", "1 if the last poll read this GPU, 0 if not.", GPU_LABELS
        )
        reserved = _gauge(
            "gpuspool_gpu_reserved_mib",
            "Memory held for jobs started but not yet visible in NVML (in MiB).",
            GPU_LABELS,
        )
        for g in snap.gpus:
            labels = [str(g["index"]), g["uuid"], g["name"]]
            healthy.add_metric(labels, 1.0 if g["healthy"] else 0.0)
            reserved.add_metric(labels, float(g.get("reserved_gib", 0.0)) * 1024.0)
        yield from (healthy, reserved)

        jobs = _gauge("gpuspool_jobs", "Jobs in the ledger by state.", ["state"])
        for state in JobState:
            jobs.add_metric([state.value], float(snap.states.get(state.value, 0)))
        yield jobs
        if snap.users:
            per_user = _gauge(
                "gpuspool_user_jobs",
                "Running and waiting jobs per submitter (metrics_user_labels).",
                ["user", "state"],
            )
            for user, running, waiting in snap.users:
                per_user.add_metric([user, "running"], float(running))
                per_user.add_metric([user, "waiting"], float(waiting))
            yield per_user

        per_job = {
            "lines_done": _gauge(
                "gpuspool_job_lines_done", "Input lines done by a running job.", JOB_LABELS
            ),
            "lines_total": _gauge(
                "gpuspool_job_input_lines", "Input lines of a running job.", JOB_LABELS
            ),
            "audio_s_done": _gauge(
                "gpuspool_job_audio_done_seconds",
                "Seconds of audio encoded by a running job.",
                JOB_LABELS,
            ),
            "audio_s_per_s": _gauge(
                "gpuspool_job_audio_seconds_per_second",
                "Throughput of a running job (audio seconds per wall second).",
                JOB_LABELS,
            ),
            "eta_s": _gauge(
                "gpuspool_job_eta_seconds", "Estimated seconds left of a running job.", JOB_LABELS
            ),
        }
        for job in snap.jobs:
            labels = [job["id"], job["name"] or "", job["gpu_uuid"] or ""]
            for key, family in per_job.items():
                value = job["progress"].get(key)
                if isinstance(value, (int, float)):
                    family.add_metric(labels, float(value))
        yield from per_job.values()

        if snap.last_tick is not None:
            last = _gauge(
                "gpuspool_last_tick_timestamp_seconds",
                "Unix time the daemon's last tick completed.",
            )
            last.add_metric([], snap.last_tick)
            yield last
        host = _gauge(
            "gpuspool_host_info",
            "This daemon's host_name (its GPUs, jobs and counters are this host's).",
            ["host"],
        )
        host.add_metric([self.hostname], 1.0)
        yield host
        draining = _gauge("gpuspool_draining", "1 while no new jobs start (gpuspool drain).")
        draining.add_metric([], 1.0 if snap.draining else 0.0)
        yield draining

    def _gpu_memory(self, snap: _Snapshot) -> Iterator[Metric]:
        """Free, used and total memory per GPU; an unreadable GPU has none, never "0 used"."""
        families = [
            (_gauge(f"gpuspool_gpu_{key}_mib", f"GPU memory {doc} (in MiB).", GPU_LABELS), key)
            for key, doc in GPU_MEMORY
        ]
        if self.dcgm_names:
            families += [
                (_gauge(f"DCGM_FI_DEV_FB_{key.upper()}", f"Framebuffer memory {key} (in MiB).",
                        DCGM_LABELS), key)
                for key, _ in GPU_MEMORY
            ]  # fmt: skip
        for g in snap.gpus:
            if not g["healthy"]:
                continue
            values = {
                "free": float(g["free_mib"]),
                "used": float(g["total_mib"] - g["free_mib"]),
                "total": float(g["total_mib"]),
            }
            index = str(g["index"])
            ours = [index, g["uuid"], g["name"]]
            dcgm = [index, g["uuid"], f"nvidia{index}", g["name"], self.hostname]
            for family, key in families:
                labels = dcgm if family.name.startswith("DCGM_") else ours
                family.add_metric(labels, values[key])
        for family, _ in families:
            yield family


class DaemonMetrics:
    """The daemon's metrics in a registry of their own; ``observe`` once after each tick."""

    def __init__(
        self, start_after_seq: int = 0, *, dcgm_names: bool = False, hostname: str | None = None
    ) -> None:
        # No ``*_created`` series: they double every counter and promtool flags them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        self._snapshot = _SnapshotCollector(dcgm_names, hostname or socket.gethostname())
        self.registry.register(self._snapshot)
        r = self.registry
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes...
        Info("gpuspool_build", "The running gpuspool version.", registry=r).info(
            {"version": __version__}
        )
        self.probe_errors = Counter(
            "gpuspool_gpu_probe_errors",
            "Polls that could not read a GPU (UUID empty: the whole probe failed).",
            ["UUID"],
            registry=r,
        )
        self.started = Counter("gpuspool_jobs_started", "Job starts (each attempt).", registry=r)
        self.finished = Counter(
            "gpuspool_jobs_finished",
            "Jobs that reached a final state, by outcome (done, failed, cancelled).",
            ["outcome"],
            registry=r,
        )
        self.retried = Counter(
            "gpuspool_jobs_retried", "Runs that failed retryably and were deferred.", registry=r
        )
        self.interrupted = Counter(
            "gpuspool_jobs_interrupted",
            "Runs stopped before finishing (daemon stop, crash); they resume.",
            registry=r,
        )
        self.yielded = Counter(
            "gpuspool_jobs_yielded",
            "Runs stopped to give the GPU to another user's process; they wait again.",
            registry=r,
        )
        self.wait = Histogram(
            "gpuspool_job_wait_seconds",
            "Seconds from becoming runnable (submitted, requeued, deferred) to starting.",
            buckets=TIME_BUCKETS_S,
            registry=r,
        )
        self.duration = Histogram(
            "gpuspool_job_duration_seconds",
            "Seconds a run lasted, by how it ended (done, failed, cancelled, retry, interrupted,"
            " yielded).",
            ["outcome"],
            buckets=TIME_BUCKETS_S,
            registry=r,
        )
        self.tick = Histogram(
            "gpuspool_tick_duration_seconds",
            "Seconds each tick took (intake, reaping, polling the GPUs, placing, launching).",
            buckets=TICK_BUCKETS_S,
            registry=r,
        )
        # Every known label value from zero, so rate() and absent() work before the first event.
        self.probe_errors.labels("")
        for outcome in FINISH_OUTCOMES:
            self.finished.labels(outcome)
        for outcome in RUN_OUTCOMES:
            self.duration.labels(outcome)
        self._seq = start_after_seq
        self._lock = threading.Lock()

    def observe(self, daemon: Daemon, tick_s: float | None = None) -> None:
        """Take the gauges' values from the daemon and count the ledger's new transitions;
        ``tick_s`` is how long the tick just finished took."""
        with self._lock:
            if tick_s is not None:
                self.tick.observe(tick_s)
            report = daemon.last_report
            if report.probe_error:
                self.probe_errors.labels("").inc()
            gpus = daemon.describe_gpus()
            for g in gpus:
                errors = self.probe_errors.labels(g["uuid"])  # a new GPU's series starts at 0
                if not g["healthy"]:
                    errors.inc()
            self._count_transitions(daemon)
            running = daemon.running_jobs()  # this host's only, on a shared ledger
            self._snapshot.snapshot = _Snapshot(
                gpus=gpus,
                states=daemon.counts(),
                jobs=[
                    {"id": j.id, "name": j.name, "gpu_uuid": j.gpu_uuid, "progress": j.progress}
                    for j in running
                ],
                last_tick=daemon.last_tick_done,
                draining=daemon.draining,
                users=_user_counts(daemon) if daemon.settings.metrics_user_labels else [],
            )

    def _count_transitions(self, daemon: Daemon) -> None:
        rows = daemon.ledger.transitions_after(self._seq)
        own = daemon.settings.host_name
        for row in rows:
            self._seq = max(self._seq, int(row["seq"]))
            if row.get("host") not in (None, own):  # a shared ledger: another host's counts
                continue
            to, frm = row["to_state"], row["from_state"]
            if to == JobState.RUNNING.value and frm != JobState.RUNNING.value:
                self.started.inc()
                became = _last_at(daemon, row, {s.value for s in RUNNABLE_STATES})
                if became is not None:
                    self.wait.observe(max(0.0, row["at"] - became))
                continue
            if frm == JobState.RUNNING.value and to != JobState.RUNNING.value:
                began = _last_at(daemon, row, {JobState.RUNNING.value})
                outcome = _RUN_OUTCOME.get(to, to)
                if began is not None:
                    self.duration.labels(outcome).observe(max(0.0, row["at"] - began))
            if to in (JobState.DONE.value, JobState.FAILED.value, JobState.CANCELLED.value):
                self.finished.labels(to).inc()
            elif to == JobState.DEFERRED.value:
                self.retried.inc()
            elif to == JobState.INTERRUPTED.value:
                self.interrupted.inc()
            elif to == JobState.QUEUED.value and frm == JobState.RUNNING.value:
                self.yielded.inc()  # only a yield sends a running job back to the queue


def _user_counts(daemon: Daemon) -> list[tuple[str, int, int]]:
    """(user name, running, waiting) per submitter; the uid as the name when it has none."""
    from gpuspool.privileges import user_name_of
    from gpuspool.views import submitter_counts

    # The daemon's own list of waiting jobs: reading 10,000 waiting rows at every tick
    # took longer than the tick itself.
    running, waiting = submitter_counts(
        daemon.ledger, daemon.waiting_jobs(), daemon.all_running_jobs()
    )
    return [
        (user_name_of(uid) or str(uid), running.get(uid, 0), waiting.get(uid, 0))
        for uid in sorted(set(running) | set(waiting))
    ]


def _last_at(daemon: Daemon, row: dict[str, Any], into: set[str]) -> float | None:
    """When the job of ``row`` last entered one of ``into`` before ``row``."""
    earlier = [
        t
        for t in daemon.ledger.transitions(row["job_id"])
        if t["seq"] < row["seq"] and t["to_state"] in into
    ]
    return float(earlier[-1]["at"]) if earlier else None


class MetricsServer:
    """The HTTP endpoint (a daemon thread of prometheus-client's WSGI server)."""

    def __init__(self, metrics: DaemonMetrics, address: str) -> None:
        host, port = parse_loopback(address)
        try:
            self._httpd, self._thread = start_http_server(
                port, addr=host, registry=metrics.registry
            )
        except OSError as exc:
            raise MetricsAddressError(f"cannot serve metrics on {address}: {exc}") from exc
        bound = self._httpd.socket.getsockname()
        self.host, self.port = str(bound[0]), int(bound[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
