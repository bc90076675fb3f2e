"""What the daemon and the CLI need of a ledger, and the factory that opens the configured one.

Two backends implement ``LedgerBackend``: ``ledger.Ledger`` (SQLite, the embedded default, one
host) and ``ledger_pg.PgLedger`` (PostgreSQL, one ledger shared by several hosts). Callers type
against the protocol and open through ``open_ledger(settings)``, so neither knows which engine it
talks to. ``ledger_pg`` (and with it the optional ``psycopg`` driver) is imported only when a
``postgresql://`` URL is configured, so an install without the ``postgres`` extra runs on SQLite.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from gpuspool.config import ConfigError, Settings
from gpuspool.fairshare import Run
from gpuspool.ledger import FencedOut, JobRecord, Ledger, LedgerError, OutputClaimed, Waiting
from gpuspool.models import JobSpec, JobState

__all__ = [
    "ClusterLedger",
    "FencedOut",
    "JobRecord",
    "LedgerBackend",
    "LedgerError",
    "OutputClaimed",
    "Waiting",
    "open_ledger",
]


class LedgerBackend(Protocol):
    """The durable queue: jobs, their transitions (the audit trail), meta and GPU history.

    Every state change is one transaction and leaves a row in ``transitions``. Guarded moves
    (``expect``) raise ``LedgerError`` and change nothing when the job is elsewhere. One object
    is confined to one thread; open one per thread or process.
    """

    @property
    def jobs_version(self) -> tuple[int, int]:
        """Changes whenever a job's state may have changed (by this or any other connection)."""
        ...

    def close(self) -> None: ...

    # -- reads ---------------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord | None: ...

    def find(self, prefix: str) -> JobRecord: ...

    def jobs(self, states: Sequence[JobState] | None = None) -> list[JobRecord]: ...

    def waiting(self) -> list[Waiting]: ...

    def status_rows(
        self,
        *,
        finished_limit: int | None,
        waiting_limit: int | None = None,
        submitter_uid: int | None = None,
    ) -> list[dict[str, Any]]: ...

    def submitters(self) -> dict[int, tuple[float, int]]: ...

    def usage_runs(self, since: float) -> list[Run]:
        """Every run that ended at or after ``since`` and every running job (fair share)."""
        ...

    def output_claimed(self, output: str) -> str | None: ...

    def counts(self) -> dict[str, int]: ...

    def transitions(self, job_id: str | None = None) -> list[dict[str, Any]]: ...

    def transitions_after(self, after_seq: int) -> list[dict[str, Any]]: ...

    def transitions_since(self, at: float) -> list[dict[str, Any]]: ...

    def last_transition_seq(self) -> int: ...

    def gpu_history_buckets(self, since: float, bucket_s: float) -> list[dict[str, Any]]: ...

    def get_meta(self, key: str, default: str | None = None) -> str | None: ...

    def draining(self) -> bool: ...

    # -- writes --------------------------------------------------------------------------------
    def set_draining(self, on: bool) -> None: ...

    def set_meta(self, key: str, value: str) -> None: ...

    def set_reasons(
        self,
        reasons: Mapping[str, str],
        *,
        now: float,
        distance: Mapping[str, float] | None = None,
        gone: Collection[str] = (),
    ) -> None: ...

    def add(
        self,
        *,
        job_id: str,
        spec: JobSpec,
        submitter_uid: int,
        need_gib: float,
        threshold_gib: float,
        spool_file: str | None,
        now: float,
        note: str | None = None,
    ) -> bool:
        """Insert a queued job: False if ``job_id`` is there already; ``OutputClaimed`` if an
        unfinished job writes the same output (checked atomically with the insert)."""
        ...

    def transition(
        self,
        job_id: str,
        to: JobState,
        *,
        now: float,
        expect: Sequence[JobState] | None = None,
        detail: str | None = None,
        **fields: Any,
    ) -> JobRecord: ...

    def update(self, job_id: str, *, now: float, **fields: Any) -> None: ...

    def request_cancel(self, job_id: str, *, now: float) -> JobRecord: ...

    def record_gpu_history(
        self, now: float, rows: Sequence[tuple[str, float | None, float]]
    ) -> None: ...

    def prune_gpu_history(self, older_than: float) -> None: ...


class HostInfo(Protocol):
    """One host's last heartbeat (``ledger_pg.HostRow``)."""

    name: str
    gpus: Any
    version: str
    draining: bool
    age_s: float


class ClaimInfo(Protocol):
    """A claimed job and its fencing token (``ledger_pg.Claim``)."""

    job: JobRecord
    fence: int


@runtime_checkable
class ClusterLedger(Protocol):
    """What a ledger shared by several hosts adds (``ledger_pg.PgLedger``): heartbeats, atomic
    claims with a fencing token, fenced writes and requeueing a silent host's jobs. The daemon
    uses these when its ledger has them, and the single-host paths otherwise."""

    host_name: str

    def ping(self) -> bool: ...

    def is_connection_error(self, exc: BaseException) -> bool: ...

    def heartbeat(self, *, gpus: Any, version: str, draining: bool) -> None: ...

    def hosts(self) -> Sequence[HostInfo]: ...

    def claim(
        self, job_id: str, *, now: float, detail: str | None = None, **fields: Any
    ) -> ClaimInfo: ...

    def fenced_transition(
        self,
        job_id: str,
        to: JobState,
        *,
        fence: int,
        now: float,
        expect: Sequence[JobState] | None = None,
        detail: str | None = None,
        **fields: Any,
    ) -> JobRecord: ...

    def fenced_update(self, job_id: str, *, fence: int, now: float, **fields: Any) -> None: ...

    def requeue_silent_hosts(self, *, timeout_s: float, now: float) -> list[str]: ...

    def audit(self, job_id: str) -> list[dict[str, Any]]: ...


def open_ledger(settings: Settings, *, readonly: bool = False) -> LedgerBackend:
    """The ledger ``settings.ledger_url`` names (SQLite in ``state_dir`` when unset).

    Raises ``ConfigError`` when a PostgreSQL URL is set but the driver is not installed, naming
    the setting and the extra to install.
    """
    if not settings.ledger_is_shared:
        return Ledger(settings.ledger_path, readonly=readonly)
    try:
        from gpuspool.ledger_pg import PgLedger
    except ImportError as exc:
        raise ConfigError(
            None,
            f"a PostgreSQL URL, but the PostgreSQL driver is not installed ({exc});"
            " install gpuspool with the postgres extra: pip install 'gpuspool[postgres]'",
            "ledger_url",
        ) from exc
    return PgLedger(
        settings.ledger_location,
        host_name=settings.host_name,
        readonly=readonly,
        io_timeout_s=max(1.0, settings.host_timeout_s / 4),
        host_timeout_s=settings.host_timeout_s,
    )
