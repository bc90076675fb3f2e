"""The long-running service around ``Daemon.tick``: scheduler, spool watch, signals, systemd.

Signal handlers only set flags; the main thread acts on them. The first SIGTERM (or SIGINT) stops
new starts, asks running jobs to checkpoint and stop, waits up to ``stop_grace_s`` and exits 0;
a second one stops them hard. SIGHUP re-reads the configuration without touching running jobs.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from gpuspool import logs
from gpuspool.config import Settings, load_settings
from gpuspool.daemon import Daemon
from gpuspool.gpus import make_probe
from gpuspool.ledger import JobRecord, Ledger
from gpuspool.models import RUNNABLE_STATES, JobState
from gpuspool.runner import ProcessRunner
from gpuspool.spool import Spool
from gpuspool.systemd import Notifier
from gpuspool.timers import TickScheduler
from gpuspool.views import publish_snapshot


class _Flags:
    def __init__(self) -> None:
        self.event = threading.Event()
        self.stop = 0
        self.reload = False

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self.reload = True
        else:
            self.stop += 1
        self.event.set()


def _watch_spool(incoming: Path, wake: Any) -> Any:
    """Wake the tick when something lands in ``incoming/`` (inotify where available)."""
    try:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer
    except ImportError:  # pragma: no cover - a base dependency
        return None

    class _Handler(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            if event.event_type in ("created", "moved", "closed"):
                wake()

    observer = Observer()
    observer.schedule(_Handler(), str(incoming), recursive=False)
    observer.daemon = True
    observer.start()
    return observer


def status_line(daemon: Daemon) -> str:
    """The one-line summary systemd shows (``STATUS=``)."""
    counts = daemon.ledger.counts()
    waiting = sum(counts.get(s.value, 0) for s in RUNNABLE_STATES)
    views = daemon.gpu_views()
    free = sum(1 for v in views if v.snapshot.healthy and (v.available_gib or 0) > 0)
    text = (
        f"{waiting} waiting, {counts.get(JobState.RUNNING.value, 0)} running,"
        f" {counts.get(JobState.DONE.value, 0)} done,"
        f" {counts.get(JobState.FAILED.value, 0)} failed;"
        f" GPUs: {len(views)} seen, {free} with free memory"
    )
    if daemon.draining:
        text = "draining; " + text
    return text


def build_daemon(settings: Settings) -> Daemon:
    """Compose the daemon from settings (the real adapters)."""
    from gpuspool import privileges

    euid = os.geteuid()

    def identity_for(uid: int) -> Any:
        if uid == 0 and euid == 0 and settings.allow_root_jobs and not settings.fallback_user:
            return privileges.current_identity()
        return privileges.job_identity(uid, daemon_euid=euid, fallback_user=settings.fallback_user)

    return Daemon(
        settings,
        ledger=Ledger(settings.ledger_path),
        spool=Spool(settings.spool_dir, max_bytes=settings.max_job_file_bytes),
        probe=make_probe(settings.gpu_source),
        runner=ProcessRunner(),
        environ=os.environ,
        daemon_euid=euid,
        identity_for=identity_for,
    )


def _start_metrics(settings: Settings, daemon: Daemon) -> tuple[Any, Any]:
    """The metrics registry and its HTTP server, if ``metrics_address`` is set (else Nones)."""
    if not settings.metrics_address:
        return None, None
    from gpuspool.metrics import DaemonMetrics, MetricsServer, parse_loopback

    parse_loopback(settings.metrics_address)  # refuse a non-loopback address before binding
    metrics = DaemonMetrics(start_after_seq=daemon.ledger.last_transition_seq())
    server = MetricsServer(metrics, settings.metrics_address)
    logs.get().info("metrics_serving", url=server.url)
    return metrics, server


def _start_webhook(settings: Settings, daemon: Daemon) -> Any:
    """The finish/failure webhook, if ``webhook_url`` is set; hooked into the daemon."""
    if not settings.webhook_url:
        return None
    from gpuspool.views import job_dict
    from gpuspool.webhook import Webhook, finish_body

    webhook = Webhook(settings.webhook_url)

    def on_finish(job: JobRecord) -> None:
        webhook.notify(finish_body(job_dict(job)))

    daemon.finish_hooks.append(on_finish)
    return webhook


def run(settings: Settings, config_path: Path | None) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    log = logs.get()
    notifier = Notifier.from_env()
    flags = _Flags()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, flags.on_signal)

    daemon = build_daemon(settings)
    daemon.startup(time.time())
    try:
        metrics, metrics_server = _start_metrics(settings, daemon)
        webhook = _start_webhook(settings, daemon)
    except ValueError as exc:  # a bad metrics_address or webhook_url: fail fast
        log.error("config_invalid", error=str(exc))
        daemon.ledger.close()
        daemon.probe.close()
        return 2
    lock = threading.Lock()

    def tick() -> None:
        with lock:
            if daemon.stopping or flags.stop:  # SIGTERM: start nothing more, even before the
                return  # main thread gets to stop the scheduler
            try:
                daemon.tick(time.time())
            except Exception:
                log.exception("tick_failed")
                return
            if metrics is not None:
                try:
                    metrics.observe(daemon)
                except Exception:
                    log.exception("metrics_observe_failed")
            _publish(daemon)

    published = [0.0]

    def _publish(daemon: Daemon) -> None:
        """At most once a second, the status snapshot for users who cannot open the ledger."""
        now = time.time()
        if now - published[0] < 1.0:
            return
        published[0] = now
        try:
            publish_snapshot(
                daemon.settings.status_snapshot_path,
                daemon.ledger,
                now,
                threshold_gib=daemon.settings.min_free_gib,
                stable_polls=daemon.settings.stable_polls,
            )
        except Exception:
            log.exception("status_snapshot_failed")

    scheduler = TickScheduler(tick, settings.poll_interval_s)
    scheduler.start()
    observer = _watch_spool(settings.incoming_dir, scheduler.wake)
    # Ready once intake, queue and a first GPU poll are up.
    deadline = time.monotonic() + 30
    while daemon.last_tick_done is None and time.monotonic() < deadline and not flags.stop:
        time.sleep(0.02)
    notifier.ready()
    log.info(
        "daemon_started",
        pid=os.getpid(),
        gpu_source=settings.gpu_source,
        spool_dir=str(settings.spool_dir),
        state_dir=str(settings.state_dir),
        poll_interval_s=settings.poll_interval_s,
        min_free_gib=settings.min_free_gib,
    )
    watchdog_s = notifier.watchdog_interval_s
    last_status = ""
    while True:
        flags.event.wait(timeout=min(watchdog_s or 1.0, 1.0))
        flags.event.clear()
        if flags.stop:
            break
        if flags.reload:
            flags.reload = False
            notifier.reloading()
            try:
                new = load_settings(config_path)
            except Exception as exc:
                log.error("config_reload_failed", error=str(exc))
            else:
                with lock:
                    daemon.settings = new
                scheduler.reschedule(new.poll_interval_s)
                log.info("config_reloaded", config=str(config_path))
            notifier.ready()
        done = daemon.last_tick_done
        # Ping the watchdog only while ticks actually complete.
        stale_after = max(3 * daemon.settings.poll_interval_s, 2 * (watchdog_s or 0.0))
        if watchdog_s and done is not None and time.time() - done < stale_after:
            notifier.watchdog()
        line = status_line(daemon)
        if line != last_status:
            notifier.status(line)
            last_status = line

    notifier.stopping()
    log.info("daemon_stopping", running=daemon.running_count())
    if observer is not None:
        observer.stop()
    with lock:
        daemon.stopping = True
    scheduler.shutdown()
    _drain(daemon, flags)
    if metrics_server is not None:
        metrics_server.close()
    if webhook is not None:
        webhook.close(timeout_s=5.0)
    daemon.ledger.close()
    daemon.probe.close()
    log.info("daemon_stopped")
    return 0


def _drain(daemon: Daemon, flags: _Flags) -> None:
    """Ask running jobs to stop and checkpoint, then file them as interrupted."""
    hard = flags.stop > 1
    daemon.stop_all(time.time(), hard=hard)
    deadline = time.monotonic() + daemon.settings.stop_grace_s + 5
    while daemon.running_count() and time.monotonic() < deadline:
        if flags.stop > 1 and not hard:
            hard = True
            daemon.stop_all(time.time(), hard=True)
        daemon.reap(time.time(), daemon.last_report)
        time.sleep(0.1)
    if daemon.running_count():
        daemon.stop_all(time.time(), hard=True)
        time.sleep(0.5)
        daemon.reap(time.time(), daemon.last_report)
