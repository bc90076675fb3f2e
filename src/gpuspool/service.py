"""The long-running service around ``Daemon.tick``: build, serve, shut down.

``Service.build`` takes the state directory's lock before anything else (one daemon per
``state_dir``), opens and checks the ledger, recovers running jobs and starts metrics and the
webhook; anything that makes starting wrong is a :class:`StartupError` (one line, exit 2).
``Service.serve`` runs the tick on the scheduler's one thread and keeps the main thread for
signals, systemd and reloads. ``Service.shutdown`` drains and closes.

Signal handlers only set flags; the main thread acts on them. The first SIGTERM (or SIGINT) stops
new starts, asks running jobs to checkpoint and stop, waits up to ``stop_grace_s`` and exits 0;
a second one stops them hard. SIGHUP re-reads the configuration: what a changed setting needs is
rebuilt (spool, probe, metrics, webhook), and a setting that cannot change while running is named
in the log (``config_needs_restart``).

Threads: the daemon's ledger connection is used by the tick thread only, and by the main thread
only before the scheduler starts and after it has stopped. What the main thread shows (systemd
``STATUS=``) is computed by the tick and handed over as a string.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import stat
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from gpuspool import logs
from gpuspool.config import ConfigError, Settings, load_settings
from gpuspool.daemon import Daemon
from gpuspool.gpus import make_probe
from gpuspool.ledger import JobRecord, Ledger, LedgerError, LedgerUnusable
from gpuspool.ledger_api import LedgerBackend, open_ledger
from gpuspool.models import RUNNABLE_STATES, JobState
from gpuspool.runner import ProcessRunner
from gpuspool.spool import Spool
from gpuspool.systemd import Notifier
from gpuspool.timers import TickScheduler
from gpuspool.views import SnapshotPublisher

#: The lock file in ``state_dir`` held (``flock``) by the one daemon running on it.
LOCK_NAME = "daemon.lock"
#: Settings a running daemon cannot change: the lock, the ledger and the log set-up depend on them.
RESTART_SETTINGS = ("state_dir", "log_format", "log_level")


class StartupError(Exception):
    """Why the daemon cannot start (exit 2); the message is one line for the operator."""


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


def lock_state_dir(state_dir: Path) -> int:
    """Take ``state_dir/daemon.lock`` (``flock``, never blocking) and write our pid in it.

    Returns the open descriptor: the lock lasts as long as this process (close-on-exec, so no
    job inherits it). A second daemon on the same ``state_dir`` gets a :class:`StartupError`
    naming the holder's pid.
    """
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = state_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise StartupError(f"cannot create the lock file in {state_dir}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip() or "unknown"
        os.close(fd)
        raise StartupError(
            f"another gpuspool daemon (pid {holder}) is running on {state_dir}"
            f" (it holds {path}); stop it first"
        ) from exc
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _private_logs(logs_dir: Path) -> None:
    """Job logs readable by others (written before logs were private) become 0600: the logs
    folder is searchable by submitters (0711) so each can read their own log by name."""
    try:
        entries = list(os.scandir(logs_dir))
    except OSError:
        return
    for entry in entries:
        with contextlib.suppress(OSError):
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
                os.chmod(entry.path, stat.S_IMODE(st.st_mode) & 0o700, follow_symlinks=False)


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
    """The one-line summary systemd shows (``STATUS=``); call it on the tick's thread."""
    counts = daemon.counts()
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


def _identity_for(settings: Settings) -> Any:
    from gpuspool import privileges

    euid = os.geteuid()

    def identity_for(uid: int) -> Any:
        if uid == 0 and euid == 0 and settings.allow_root_jobs and not settings.fallback_user:
            return privileges.current_identity()
        return privileges.job_identity(uid, daemon_euid=euid, fallback_user=settings.fallback_user)

    return identity_for


def build_daemon(settings: Settings, ledger: LedgerBackend) -> Daemon:
    """Compose the daemon from settings (the real adapters) on an opened ledger."""
    return Daemon(
        settings,
        ledger=ledger,
        spool=Spool(settings.spool_dir, max_bytes=settings.max_job_file_bytes),
        probe=make_probe(settings.gpu_source),
        runner=ProcessRunner(),
        environ=os.environ,
        daemon_euid=os.geteuid(),
        identity_for=_identity_for(settings),
    )


class Service:
    """One daemon process: ``build()``, then ``serve()`` until a stop signal, then
    ``shutdown()``. :func:`run` does the three and maps a :class:`StartupError` to exit 2."""

    def __init__(self, settings: Settings, config_path: Path | None) -> None:
        self.settings = settings
        self.config_path = config_path
        self.log = logs.get()
        self.notifier = Notifier.from_env()
        self.flags = _Flags()
        self.lock = threading.Lock()  # the tick runs under it; the main thread swaps parts
        self.daemon: Daemon | None = None
        self.metrics: Any = None
        self.metrics_server: Any = None
        self.webhook: Any = None
        self.scheduler: TickScheduler | None = None
        self.observer: Any = None
        self.status = ""  # written by the tick, read by the main thread
        self._slow_ticks = 0  # ticks over the poll interval since the last ``tick_slow`` line
        self._slow_logged_at = float("-inf")
        self._lock_fd: int | None = None
        self._published = 0.0
        self.publisher = SnapshotPublisher(settings.status_snapshot_path)

    # -- build ----------------------------------------------------------------------------------

    def build(self) -> None:
        """Lock the state directory, open and check the ledger, recover, start the extras."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self.flags.on_signal)
        s = self.settings
        # Whatever the daemon creates is private unless it says otherwise (the status snapshots
        # and reason files set their modes; jobs get umask 022 from their launch).
        os.umask(0o077)
        self._lock_fd = lock_state_dir(s.state_dir)
        try:
            ledger = _open_ledger(s)
        except (ConfigError, LedgerError, LedgerUnusable) as exc:  # corrupt, unreachable, no driver
            raise StartupError(str(exc)) from exc
        try:
            self.daemon = build_daemon(s, ledger)
        except ValueError as exc:  # a gpu_source the probe does not know
            ledger.close()
            raise StartupError(f"config: {exc}") from exc
        self.daemon.startup(time.time())
        _private_logs(s.logs_dir)
        try:
            seq = self.daemon.ledger.last_transition_seq()  # no tick runs yet
            self.metrics, self.metrics_server = self._start_metrics(s, seq)
            self.webhook = self._start_webhook(s)
        except ValueError as exc:  # a bad metrics_address or webhook_url: fail fast
            raise StartupError(f"config: {exc}") from exc

    def _start_metrics(self, s: Settings, start_after_seq: int) -> tuple[Any, Any]:
        """The metrics registry and its HTTP server, if ``metrics_address`` is set (else Nones);
        it counts transitions after ``start_after_seq``."""
        if not s.metrics_address:
            return None, None
        from gpuspool.metrics import DaemonMetrics, MetricsServer, parse_loopback

        parse_loopback(s.metrics_address)  # refuse a non-loopback address before binding
        metrics = DaemonMetrics(
            start_after_seq=start_after_seq, dcgm_names=s.metrics_dcgm_names, hostname=s.host_name
        )
        server = MetricsServer(metrics, s.metrics_address)
        self.log.info("metrics_serving", url=server.url)
        return metrics, server

    def _start_webhook(self, s: Settings) -> Any:
        """The finish/failure webhook, if ``webhook_url`` is set; hooked into the daemon."""
        if not s.webhook_url:
            return None
        from gpuspool.views import job_dict
        from gpuspool.webhook import Webhook, finish_body

        webhook = Webhook(s.webhook_url)

        def on_finish(job: JobRecord) -> None:
            webhook.notify(finish_body(job_dict(job)))

        assert self.daemon is not None
        self.daemon.finish_hooks[:] = [on_finish]
        return webhook

    # -- serve ----------------------------------------------------------------------------------

    def tick(self) -> None:
        """One scheduled tick, then what reads the ledger for others (on this thread only)."""
        daemon = self.daemon
        assert daemon is not None
        with self.lock:
            if daemon.stopping or self.flags.stop:  # SIGTERM: start nothing more, even before
                return  # the main thread gets to stop the scheduler
            now = time.time()
            began = time.monotonic()
            try:
                daemon.tick(now)
            except Exception:
                self.log.exception("tick_failed")
                return
            took = time.monotonic() - began
            self._slow_tick(took, now)
            if daemon.ledger_unreachable:  # logged once by the daemon; nothing to publish
                return
            if self.metrics is not None:
                try:
                    self.metrics.observe(daemon, tick_s=took)
                except Exception:
                    self.log.exception("metrics_observe_failed")
            self._publish(daemon, now)

    def _slow_tick(self, took: float, now: float) -> None:
        """Warn (at most once a minute) when a tick took longer than the poll interval: starts
        are then late by that much, and the cause (a slow ledger, a flood) is worth a look."""
        assert self.daemon is not None
        interval = self.daemon.settings.poll_interval_s
        if took <= interval:
            return
        self._slow_ticks += 1
        if now - self._slow_logged_at >= 60.0:
            took_s = round(took, 3)
            self.log.warning(
                "tick_slow", seconds=took_s, poll_interval_s=interval, ticks=self._slow_ticks
            )
            self._slow_logged_at = now
            self._slow_ticks = 0

    def _publish(self, daemon: Daemon, now: float) -> None:
        """At most once a second: systemd's ``STATUS=`` line (sent by the main thread) and the
        status snapshots for users who cannot open the ledger (see ``SnapshotPublisher``)."""
        if now - self._published < 1.0:
            return
        self._published = now
        try:
            self.status = status_line(daemon)
        except Exception:
            self.log.exception("status_line_failed")
        try:
            self.publisher.publish(
                daemon.ledger,
                now,
                threshold_gib=daemon.settings.min_free_gib,
                stable_polls=daemon.settings.stable_polls,
                spool=daemon.spool,
            )
        except Exception:
            self.log.exception("status_snapshot_failed")

    def serve(self) -> None:
        """Run the ticks and answer signals until SIGTERM/SIGINT."""
        daemon = self.daemon
        assert daemon is not None
        s = self.settings
        self.scheduler = TickScheduler(self.tick, s.poll_interval_s)
        self.scheduler.start()
        self.observer = _watch_spool(s.incoming_dir, self.scheduler.wake)
        # Ready once intake, queue and a first GPU poll are up.
        deadline = time.monotonic() + 30
        while daemon.last_tick_done is None and time.monotonic() < deadline and not self.flags.stop:
            time.sleep(0.02)
        self.notifier.ready()
        self.log.info(
            "daemon_started",
            pid=os.getpid(),
            gpu_source=s.gpu_source,
            spool_dir=str(s.spool_dir),
            state_dir=str(s.state_dir),
            poll_interval_s=s.poll_interval_s,
            min_free_gib=s.min_free_gib,
            ledger=s.ledger_shown,  # which queue, and on a shared one which host this is
            host=s.host_name if s.ledger_is_shared else None,
        )
        watchdog_s = self.notifier.watchdog_interval_s
        shown = ""
        while True:
            self.flags.event.wait(timeout=min(watchdog_s or 1.0, 1.0))
            self.flags.event.clear()
            if self.flags.stop:
                break
            if self.flags.reload:
                self.flags.reload = False
                self.notifier.reloading()
                self.reload()
                self.notifier.ready()
            done = daemon.last_tick_done
            # Ping the watchdog only while ticks actually complete.
            stale_after = max(3 * daemon.settings.poll_interval_s, 2 * (watchdog_s or 0.0))
            if watchdog_s and done is not None and time.time() - done < stale_after:
                self.notifier.watchdog()
            line = self.status
            if line and line != shown:
                self.notifier.status(line)
                shown = line

    # -- reload ---------------------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the config; rebuild what changed settings need; name those needing a restart."""
        try:
            new = load_settings(self.config_path)
        except Exception as exc:
            self.log.error("config_reload_failed", error=str(exc))
            return
        old = self.settings
        changed = {k for k in type(new).model_fields if getattr(new, k) != getattr(old, k)}
        for key in sorted(changed & set(RESTART_SETTINGS)):
            self.log.warning(
                "config_needs_restart",
                setting=key,
                running=str(getattr(old, key)),
                configured=str(getattr(new, key)),
            )
        # Keep what the running process is built on; everything else takes effect now.
        applied = new.model_copy(update={k: getattr(old, k) for k in RESTART_SETTINGS})
        with self.lock:
            self._rebuild(old, applied, changed)
            assert self.daemon is not None
            self.daemon.settings = applied
            self.settings = applied
        assert self.scheduler is not None
        self.scheduler.reschedule(applied.poll_interval_s)
        self.log.info("config_reloaded", config=str(self.config_path), changed=sorted(changed))

    def _rebuild(self, old: Settings, new: Settings, changed: set[str]) -> None:
        """Replace the parts whose settings changed (under the tick lock). A part that cannot be
        rebuilt keeps running as before and the error is logged."""
        daemon = self.daemon
        assert daemon is not None and self.scheduler is not None
        if changed & {"spool_dir", "max_job_file_bytes"}:
            spool = Spool(new.spool_dir, max_bytes=new.max_job_file_bytes)
            try:
                spool.ensure_dirs()
            except OSError as exc:
                self.log.error("config_reload_failed", setting="spool_dir", error=str(exc))
            else:
                daemon.spool = spool
                self.publisher = SnapshotPublisher(new.status_snapshot_path)
                if "spool_dir" in changed:
                    if self.observer is not None:
                        self.observer.stop()
                    self.observer = _watch_spool(new.incoming_dir, self.scheduler.wake)
        if "gpu_source" in changed:
            try:
                probe = make_probe(new.gpu_source)
            except Exception as exc:
                self.log.error("config_reload_failed", setting="gpu_source", error=str(exc))
            else:
                daemon.probe.close()
                daemon.probe = probe
        if "metrics_address" in changed:
            if self.metrics_server is not None:
                self.metrics_server.close()
                self.metrics, self.metrics_server = None, None
            try:
                self.metrics, self.metrics_server = self._start_metrics(new, _last_seq(new))
            except Exception as exc:
                self.log.error("config_reload_failed", setting="metrics_address", error=str(exc))
        if "webhook_url" in changed:
            if self.webhook is not None:
                self.webhook.close(timeout_s=5.0)
                self.webhook = None
            daemon.finish_hooks.clear()
            try:
                self.webhook = self._start_webhook(new)
            except Exception as exc:
                self.log.error("config_reload_failed", setting="webhook_url", error=str(exc))
        if changed & {"fallback_user", "allow_root_jobs"}:
            daemon.identity_for = _identity_for(new)

    # -- shutdown -------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop the scheduler (waiting for a tick in progress), drain the jobs, close."""
        daemon = self.daemon
        assert daemon is not None
        self.notifier.stopping()
        self.log.info("daemon_stopping")
        if self.observer is not None:
            self.observer.stop()
        with self.lock:
            daemon.stopping = True
        if self.scheduler is not None:
            self.scheduler.shutdown()
        # From here the tick thread is gone: the main thread owns the daemon and its ledger.
        self.log.info("daemon_draining", running=daemon.running_count())
        _drain(daemon, self.flags)
        self.close()
        self.log.info("daemon_stopped")

    def close(self) -> None:
        """Release what ``build`` opened (also after a failed build)."""
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self.webhook is not None:
            self.webhook.close(timeout_s=5.0)
        if self.daemon is not None:
            self.daemon.ledger.close()
            self.daemon.probe.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def run(settings: Settings, config_path: Path | None) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code (2: could not start)."""
    service = Service(settings, config_path)
    try:
        service.build()
    except StartupError as exc:
        service.log.error("daemon_cannot_start", error=str(exc))
        with contextlib.suppress(Exception):
            service.close()
        return 2
    service.serve()
    service.shutdown()
    return 0


def _open_ledger(settings: Settings) -> LedgerBackend:
    """The daemon's ledger: SQLite checked for corruption at open (``LedgerUnusable``), or the
    shared PostgreSQL ledger (``LedgerError`` when unreachable, ``ConfigError`` without the
    driver)."""
    if settings.ledger_is_shared:
        return open_ledger(settings)
    return Ledger.open_checked(settings.ledger_path)


def _last_seq(settings: Settings) -> int:
    """The ledger's last transition, read on a connection of the calling thread's own (the
    tick's connection belongs to the tick)."""
    ledger = open_ledger(settings, readonly=True)
    try:
        return ledger.last_transition_seq()
    finally:
        ledger.close()


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
