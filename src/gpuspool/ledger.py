"""The durable queue: SQLite in WAL mode. The only module that imports sqlite3.

Every state change is one transaction and leaves a row in ``transitions``, so the history of each
job can be audited (and drawn). The CLI and the daemon open the same file; WAL lets readers run
while the daemon writes.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

from gpuspool.fairshare import Run, runs_from_rows
from gpuspool.models import RUNNABLE_STATES, TERMINAL_STATES, JobSpec, JobState

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id            TEXT PRIMARY KEY,
    name          TEXT,
    spec_json     TEXT NOT NULL,
    input         TEXT NOT NULL,
    output        TEXT NOT NULL,
    gpus_json     TEXT,
    submitter_uid INTEGER NOT NULL,
    submitted_at  REAL NOT NULL,
    seq           INTEGER NOT NULL,
    priority      INTEGER NOT NULL DEFAULT 0,
    state         TEXT NOT NULL,
    need_gib      REAL NOT NULL,
    threshold_gib REAL NOT NULL,
    gpu_uuid      TEXT,
    pid           INTEGER,
    pid_start     REAL,
    started_at    REAL,
    finished_at   REAL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    not_before    REAL,
    reason        TEXT,
    exit_class    TEXT,
    progress_json TEXT,
    peak_gib      REAL,
    log_path      TEXT,
    spool_file    TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    updated_at    REAL NOT NULL,
    yields        INTEGER NOT NULL DEFAULT 0,
    last_yield_json TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_output ON jobs(output);
CREATE INDEX IF NOT EXISTS jobs_submitter ON jobs(submitter_uid);
CREATE TABLE IF NOT EXISTS transitions (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id     TEXT NOT NULL,
    at         REAL NOT NULL,
    from_state TEXT,
    to_state   TEXT NOT NULL,
    detail     TEXT
);
CREATE INDEX IF NOT EXISTS transitions_job ON transitions(job_id);
CREATE INDEX IF NOT EXISTS transitions_at ON transitions(at);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS gpu_history (
    at       REAL NOT NULL,
    uuid     TEXT NOT NULL,
    free_mib REAL,
    total_mib REAL
);
CREATE INDEX IF NOT EXISTS gpu_history_at ON gpu_history(at);
"""

#: Columns added to ``jobs`` after the first schema: (name, declaration), added to an older file
#: at open (version 2: the yield count and the last yield).
_ADDED_COLUMNS = (
    ("yields", "INTEGER NOT NULL DEFAULT 0"),
    ("last_yield_json", "TEXT"),
)


@lru_cache(maxsize=4096)
def _parse_spec(spec_json: str) -> JobSpec:
    return JobSpec.model_validate_json(spec_json)


class Waiting(NamedTuple):
    """The columns placement needs of a job that is not running or finished (cheap to load)."""

    id: str
    state: JobState
    priority: int
    seq: int
    threshold_gib: float
    not_before: float | None
    gpus: tuple[str | int, ...] | None
    submitter_uid: int = 0
    #: The job's ``hosts`` allow-list (a shared ledger only; None: any host).
    hosts: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class JobRecord:
    """One row of the ledger, as the rest of the daemon sees it."""

    id: str
    name: str | None
    spec_json: str
    input: str
    output: str
    submitter_uid: int
    submitted_at: float
    seq: int
    priority: int
    state: JobState
    need_gib: float
    threshold_gib: float
    gpu_uuid: str | None = None
    pid: int | None = None
    pid_start: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    not_before: float | None = None
    reason: str | None = None
    exit_class: str | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    peak_gib: float | None = None
    log_path: str | None = None
    spool_file: str | None = None
    cancel_requested: bool = False
    updated_at: float = 0.0
    #: The host running the current attempt and the attempt's fencing token (shared ledger only).
    host: str | None = None
    fence: int = 0
    #: How often the job stepped aside for another user's process, and the last time: pid,
    #: user, gpu_uuid, gpu_index, at (see ``yield_words``).
    yields: int = 0
    last_yield: dict[str, Any] | None = None

    @property
    def label(self) -> str:
        return self.name or self.id

    @property
    def spec(self) -> JobSpec:
        """The job file's settings (parsed on first use; most views need only the columns)."""
        return _parse_spec(self.spec_json)


class LedgerError(Exception):
    """A requested change does not apply to the job in its current state."""


class FencedOut(LedgerError):
    """A write carried a fencing token that is no longer the job's: another attempt owns it
    (raised by the shared ledger only; defined here so the daemon need not import its driver)."""


class OutputClaimed(LedgerError):
    """``add``: another unfinished job already writes this output (its id is ``other``)."""

    def __init__(self, output: str, other: str) -> None:
        super().__init__(f"output: {output} is already the output of job {other}")
        self.other = other


class LedgerUnusable(Exception):
    """The ledger cannot be opened, or fails its integrity check: the daemon must not run on it
    (it would reject every new job). The message is one line naming the file."""


def record_from_row(row: Any) -> JobRecord:
    """A ``jobs`` row of either backend (``sqlite3.Row`` or a psycopg dict row) as a record;
    ``host`` and ``fence`` exist on the shared ledger only."""
    keys = row.keys()
    return JobRecord(
        id=row["id"],
        name=row["name"],
        spec_json=row["spec_json"],
        input=row["input"],
        output=row["output"],
        submitter_uid=row["submitter_uid"],
        submitted_at=row["submitted_at"],
        seq=row["seq"],
        priority=row["priority"],
        state=JobState(row["state"]),
        need_gib=row["need_gib"],
        threshold_gib=row["threshold_gib"],
        gpu_uuid=row["gpu_uuid"],
        pid=row["pid"],
        pid_start=row["pid_start"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        attempts=row["attempts"],
        not_before=row["not_before"],
        reason=row["reason"],
        exit_class=row["exit_class"],
        progress=json.loads(row["progress_json"]) if row["progress_json"] else {},
        peak_gib=row["peak_gib"],
        log_path=row["log_path"],
        spool_file=row["spool_file"],
        cancel_requested=bool(row["cancel_requested"]),
        updated_at=row["updated_at"],
        host=row["host"] if "host" in keys else None,
        fence=int(row["fence"] or 0) if "fence" in keys else 0,
        yields=int(row["yields"] or 0) if "yields" in keys else 0,
        last_yield=json_object(row["last_yield_json"]) if "last_yield_json" in keys else None,
    )


def json_object(raw: object) -> dict[str, Any] | None:
    """``raw`` (a stored or printed string) as a JSON object, or None for anything else, deep
    nesting included: a view never fails on a row or a log line."""
    if not isinstance(raw, str) or not raw:
        return None
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _record_transition(
    db: sqlite3.Connection,
    job_id: str,
    at: float,
    from_state: str | None,
    to_state: str,
    detail: str | None,
) -> None:
    db.execute(
        "INSERT INTO transitions(job_id, at, from_state, to_state, detail) VALUES(?, ?, ?, ?, ?)",
        (job_id, at, from_state, to_state, detail),
    )


class Ledger:
    """The job queue on disk. Thread-confined: open one per thread (or process)."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        if readonly:
            uri = f"file:{path}?mode=ro"
            self._db = sqlite3.connect(
                uri, uri=True, timeout=30, isolation_level=None, check_same_thread=False
            )
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                path, timeout=30, isolation_level=None, check_same_thread=False
            )
        self._db.row_factory = sqlite3.Row
        self._state_writes = 0
        if not readonly:
            self._db.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a commit survives a crash or kill of any process; only a power cut
            # can drop the last commits, after which their processes are gone too.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            with self._tx() as db:
                self._add_columns(db)
                db.execute(
                    "INSERT INTO meta(key, value) VALUES('schema_version', ?)"
                    " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (str(SCHEMA_VERSION),),
                )

    @staticmethod
    def _add_columns(db: sqlite3.Connection) -> None:
        """Bring a file made by an older version up to this schema (``_ADDED_COLUMNS``)."""
        have = {r[1] for r in db.execute("PRAGMA table_info(jobs)").fetchall()}
        for name, declaration in _ADDED_COLUMNS:
            if name not in have:
                db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {declaration}")

    def close(self) -> None:
        self._db.close()

    @classmethod
    def open_checked(cls, path: Path) -> Ledger:
        """The daemon's ledger, created if missing, after ``PRAGMA quick_check``.

        Raises :class:`LedgerUnusable` for a file SQLite cannot open or that is corrupt, so the
        daemon stops at start-up with the reason instead of failing every write later.
        """
        try:
            ledger = cls(path)
            # Private whatever its age: the state folder is searchable by submitters (0711).
            for part in (
                path,
                path.with_name(path.name + "-wal"),
                path.with_name(path.name + "-shm"),
            ):
                if part.exists():
                    part.chmod(0o600)
        except (sqlite3.Error, OSError) as exc:
            raise LedgerUnusable(f"cannot open the ledger {path}: {exc}") from exc
        try:
            rows = ledger._db.execute("PRAGMA quick_check(5)").fetchall()
            problems = [str(r[0]) for r in rows if str(r[0]) != "ok"]
        except sqlite3.Error as exc:
            problems = [str(exc)]
        if problems:
            ledger.close()
            detail = "; ".join(" ".join(p.split()) for p in problems)
            raise LedgerUnusable(
                f"the ledger {path} is corrupt ({detail}); restore it from a backup, or move it"
                " aside to start with a new one"
            )
        return ledger

    def _bump(self) -> None:
        self._state_writes += 1

    @property
    def jobs_version(self) -> tuple[int, int]:
        """Changes whenever a job's state may have changed (by this or any other connection)."""
        data_version = self._db.execute("PRAGMA data_version").fetchone()[0]
        return (data_version, self._state_writes)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- reads ---------------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return record_from_row(row) if row else None

    def find(self, prefix: str) -> JobRecord:
        """The job whose id (or name) is ``prefix`` or starts with it; errors if none or several."""
        rows = self._db.execute(
            "SELECT * FROM jobs WHERE id LIKE ? ESCAPE '\\' OR name = ? ORDER BY seq",
            (prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%", prefix),
        ).fetchall()
        if not rows:
            raise LedgerError(f"no job matches {prefix!r}")
        if len(rows) > 1:
            exact = [r for r in rows if r["id"] == prefix]
            if len(exact) == 1:
                return record_from_row(exact[0])
            raise LedgerError(f"{prefix!r} matches {len(rows)} jobs; give more of the id")
        return record_from_row(rows[0])

    def jobs(self, states: Sequence[JobState] | None = None) -> list[JobRecord]:
        if states is None:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY seq").fetchall()
        else:
            marks = ",".join("?" for _ in states)
            rows = self._db.execute(
                f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY seq",
                [s.value for s in states],
            ).fetchall()
        return [record_from_row(r) for r in rows]

    def waiting(self) -> list[Waiting]:
        """Jobs not running and not finished, with only what placement needs, by priority."""
        rows = self._db.execute(
            "SELECT id, state, priority, seq, threshold_gib, not_before, gpus_json, submitter_uid"
            " FROM jobs WHERE state IN (?, ?, ?, ?) ORDER BY priority DESC, seq",
            (JobState.QUEUED.value, JobState.INTERRUPTED.value, JobState.DEFERRED.value,
             JobState.HELD.value),
        ).fetchall()  # fmt: skip
        return [
            Waiting(
                r[0],
                JobState(r[1]),
                r[2],
                r[3],
                r[4],
                r[5],
                None if r[6] is None else tuple(json.loads(r[6])),
                int(r[7]),
            )
            for r in rows
        ]

    def usage_runs(self, since: float) -> list[Run]:
        """Runs for fair share: every run that ended at or after ``since`` (from the
        transitions, so a retried job's earlier runs count too), and every running job (from
        its ``started_at``, ``end`` None)."""
        running = JobState.RUNNING.value
        ended = self._db.execute(
            "SELECT e.job_id, j.submitter_uid, (SELECT MAX(s.at) FROM transitions s WHERE"
            " s.job_id = e.job_id AND s.seq < e.seq AND s.to_state = ?), e.at"
            " FROM transitions e JOIN jobs j ON j.id = e.job_id"
            " WHERE e.at >= ? AND e.from_state = ? AND e.to_state != ?",
            (running, since, running, running),
        ).fetchall()
        live = self._db.execute(
            "SELECT id, submitter_uid, started_at FROM jobs"
            " WHERE state = ? AND started_at IS NOT NULL",
            (running,),
        ).fetchall()
        return runs_from_rows(ended, live)

    def status_rows(
        self,
        *,
        finished_limit: int | None,
        waiting_limit: int | None = None,
        submitter_uid: int | None = None,
    ) -> list[dict[str, Any]]:
        """Plain rows for ``status``: unfinished jobs (at most ``waiting_limit`` of those that
        wait, first to start first) and the latest finished ones, in submission order.

        Reads columns only (no job-file parsing), so a queue of 10,000 jobs stays fast. With
        ``submitter_uid``, only that user's jobs.
        """
        cols = (
            "id, name, state, gpu_uuid, priority, need_gib, threshold_gib, attempts, reason,"
            " exit_class, submitted_at, started_at, finished_at, peak_gib, submitter_uid, input,"
            " output, progress_json, log_path, seq, updated_at, yields, last_yield_json"
        )
        terminal = [s.value for s in TERMINAL_STATES]
        limit = -1 if finished_limit is None else finished_limit
        cur = self._db.cursor()
        cur.row_factory = None  # plain tuples: much cheaper than sqlite3.Row for many rows
        rows: list[dict[str, Any]] = []
        waiting = [st.value for st in (*RUNNABLE_STATES, JobState.HELD)]
        who, whom = (
            ("", []) if submitter_uid is None else (" AND submitter_uid = ?", [submitter_uid])
        )
        for sql, args in (
            (f"SELECT {cols} FROM jobs WHERE state = ?{who}", [JobState.RUNNING.value, *whom]),
            (
                f"SELECT {cols} FROM jobs WHERE state IN (?, ?, ?, ?){who}"
                " ORDER BY priority DESC, seq LIMIT ?",
                [*waiting, *whom, -1 if waiting_limit is None else waiting_limit],
            ),
            (
                f"SELECT {cols} FROM jobs WHERE state IN (?, ?, ?){who}"
                " ORDER BY COALESCE(finished_at, updated_at) DESC LIMIT ?",
                [*terminal, *whom, limit],
            ),
        ):
            cur.execute(sql, args)
            names = [d[0] for d in cur.description]
            rows.extend(dict(zip(names, r, strict=True)) for r in cur.fetchall())
        rows.sort(key=lambda r: r["seq"])
        return rows

    def submitters(self) -> dict[int, tuple[float, int]]:
        """Each submitter's uid with (latest change to one of their jobs, their job count):
        what changes whenever their own status would."""
        rows = self._db.execute(
            "SELECT submitter_uid, MAX(updated_at), COUNT(*) FROM jobs GROUP BY submitter_uid"
        ).fetchall()
        return {int(r[0]): (float(r[1]), int(r[2])) for r in rows}

    def output_claimed(self, output: str) -> str | None:
        """The id of an unfinished job that writes ``output``, if any."""
        return self._output_owner(self._db, output)

    @staticmethod
    def _output_owner(db: sqlite3.Connection, output: str) -> str | None:
        row = db.execute(
            "SELECT id FROM jobs WHERE output = ? AND state NOT IN (?, ?, ?) LIMIT 1",
            (output, *(s.value for s in TERMINAL_STATES)),
        ).fetchone()
        return None if row is None else str(row[0])

    def set_reasons(
        self,
        reasons: Mapping[str, str],
        *,
        now: float,
        distance: Mapping[str, float] | None = None,
        gone: Collection[str] = (),
    ) -> None:
        """Record many waiting reasons in one transaction (jobs no longer waiting keep theirs).

        One host writes this ledger: ``distance`` and ``gone`` (which choose between several
        hosts' reasons on a shared ledger, ``PgLedger.set_reasons``) are not needed here."""
        if not reasons:
            return
        waiting = ", ".join(f"'{s.value}'" for s in sorted(RUNNABLE_STATES | {JobState.HELD}))
        with self._tx() as db:
            db.executemany(
                f"UPDATE jobs SET reason = ?, updated_at = ? WHERE id = ? AND state IN ({waiting})",
                [(reason, now, job_id) for job_id, reason in reasons.items()],
            )

    def counts(self) -> dict[str, int]:
        rows = self._db.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
        return {r["state"]: r["n"] for r in rows}

    def transitions(self, job_id: str | None = None) -> list[dict[str, Any]]:
        if job_id is None:
            rows = self._db.execute("SELECT * FROM transitions ORDER BY seq").fetchall()
        else:
            rows = self._db.execute(
                "SELECT * FROM transitions WHERE job_id = ? ORDER BY seq", (job_id,)
            ).fetchall()
        return [dict(r) for r in rows]

    def transitions_after(self, after_seq: int) -> list[dict[str, Any]]:
        """Transitions newer than ``after_seq``, oldest first (metrics count them once)."""
        rows = self._db.execute(
            "SELECT * FROM transitions WHERE seq > ? ORDER BY seq", (after_seq,)
        ).fetchall()
        return [dict(r) for r in rows]

    def transitions_since(self, at: float) -> list[dict[str, Any]]:
        """All transitions of the jobs that moved at or after ``at`` or are not finished (plots)."""
        rows = self._db.execute(
            "SELECT * FROM transitions WHERE job_id IN"
            " (SELECT job_id FROM transitions WHERE at >= ?)"
            " OR job_id IN (SELECT id FROM jobs WHERE state NOT IN (?, ?, ?)) ORDER BY seq",
            (at, *(s.value for s in TERMINAL_STATES)),
        ).fetchall()
        return [dict(r) for r in rows]

    def last_transition_seq(self) -> int:
        row = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM transitions").fetchone()
        return int(row[0])

    def gpu_history_buckets(self, since: float, bucket_s: float) -> list[dict[str, Any]]:
        """GPU history in ``bucket_s`` slices: per GPU, the lowest and the mean free MiB.

        A slice where every poll was unreadable has ``min_free_mib`` None (a gap, not zero).
        """
        rows = self._db.execute(
            "SELECT uuid, CAST((at - ?) / ? AS INTEGER) AS bucket, MIN(at) AS at,"
            " MIN(free_mib) AS min_free_mib, AVG(free_mib) AS mean_free_mib,"
            " MAX(total_mib) AS total_mib, COUNT(*) AS polls"
            " FROM gpu_history WHERE at >= ? GROUP BY uuid, bucket ORDER BY uuid, bucket",
            (since, bucket_s, since),
        ).fetchall()
        return [dict(r) for r in rows]

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row["value"] if row else default

    def draining(self) -> bool:
        """Whether ``gpuspool drain`` is in force (no new job starts)."""
        return self.get_meta("draining", "0") == "1"

    def set_draining(self, on: bool) -> None:
        self.set_meta("draining", "1" if on else "0")

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO meta(key, value) VALUES(?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    # -- writes --------------------------------------------------------------------------------

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
        """Insert a queued job; False (and no change) if ``job_id`` is already there;
        ``OutputClaimed`` (and no change) if another unfinished job writes the same output.

        ``note`` (e.g. a lowered priority) is added to the "submitted" transition's detail."""
        self._bump()
        with self._tx() as db:
            if db.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone():
                return False
            other = self._output_owner(db, str(spec.output))
            if other is not None:
                raise OutputClaimed(str(spec.output), other)
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            db.execute(
                "INSERT INTO jobs(id, name, spec_json, input, output, gpus_json, submitter_uid,"
                " submitted_at, seq, priority, state, need_gib, threshold_gib, spool_file,"
                " updated_at) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    spec.name,
                    spec.model_dump_json(),
                    str(spec.input),
                    str(spec.output),
                    None if spec.gpus is None else json.dumps(spec.gpus),
                    submitter_uid,
                    now,
                    seq,
                    spec.priority,
                    JobState.QUEUED.value,
                    need_gib,
                    threshold_gib,
                    spool_file,
                    now,
                ),
            )
            detail = "submitted" if note is None else f"submitted; {note}"
            _record_transition(db, job_id, now, None, JobState.QUEUED.value, detail)
        return True

    def transition(
        self,
        job_id: str,
        to: JobState,
        *,
        now: float,
        expect: Sequence[JobState] | None = None,
        detail: str | None = None,
        **fields: Any,
    ) -> JobRecord:
        """Move a job to ``to`` (and set ``fields``) in one transaction.

        ``expect`` guards the move: if the job is not in one of those states, nothing changes and
        ``LedgerError`` is raised. That is how two writers (the daemon and a ``cancel`` from the
        CLI) never both win.
        """
        allowed = {
            "gpu_uuid",
            "pid",
            "pid_start",
            "started_at",
            "finished_at",
            "attempts",
            "not_before",
            "reason",
            "exit_class",
            "peak_gib",
            "log_path",
            "cancel_requested",
            "spool_file",
            "yields",
            "last_yield_json",
        }
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"unknown job fields {sorted(unknown)}")
        self._bump()
        with self._tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise LedgerError(f"no job {job_id}")
            current = JobState(row["state"])
            if expect is not None and current not in expect:
                raise LedgerError(
                    f"job {job_id} is {current.value}, not {'/'.join(s.value for s in expect)}"
                )
            sets = ["state = ?", "updated_at = ?"] + [f"{k} = ?" for k in fields]
            values: list[Any] = [to.value, now, *fields.values(), job_id]
            db.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ?", values)
            if current != to:
                _record_transition(db, job_id, now, current.value, to.value, detail)
            new = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return record_from_row(new)

    def update(self, job_id: str, *, now: float, **fields: Any) -> None:
        """Set non-state fields (progress, reason, peak) without a transition row."""
        allowed = {"reason", "progress", "peak_gib", "cancel_requested", "need_gib"}
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"unknown job fields {sorted(unknown)}")
        cols = {("progress_json" if k == "progress" else k): v for k, v in fields.items()}
        if "progress_json" in cols:
            cols["progress_json"] = json.dumps(cols["progress_json"], sort_keys=True)
        sets = ", ".join(f"{k} = ?" for k in cols)
        with self._tx() as db:
            db.execute(
                f"UPDATE jobs SET {sets}, updated_at = ? WHERE id = ?",
                [*cols.values(), now, job_id],
            )

    def request_cancel(self, job_id: str, *, now: float) -> JobRecord:
        """Cancel a waiting job at once; flag a running one for the daemon to stop."""
        self._bump()
        with self._tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise LedgerError(f"no job {job_id}")
            state = JobState(row["state"])
            if state in TERMINAL_STATES:
                raise LedgerError(f"job {job_id} is already {state.value}")
            if state == JobState.RUNNING:
                db.execute(
                    "UPDATE jobs SET cancel_requested = 1, updated_at = ? WHERE id = ?",
                    (now, job_id),
                )
            else:
                db.execute(
                    "UPDATE jobs SET state = ?, finished_at = ?, reason = ?, updated_at = ?"
                    " WHERE id = ?",
                    (JobState.CANCELLED.value, now, "cancelled by user", now, job_id),
                )
                _record_transition(
                    db, job_id, now, state.value, JobState.CANCELLED.value, "cancelled by user"
                )
            new = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return record_from_row(new)

    def record_gpu_history(
        self, now: float, rows: Sequence[tuple[str, float | None, float]]
    ) -> None:
        """Append one poll of GPU memory; pruned to ``keep_s`` by ``prune_gpu_history``."""
        with self._tx() as db:
            db.executemany(
                "INSERT INTO gpu_history(at, uuid, free_mib, total_mib) VALUES(?, ?, ?, ?)",
                [(now, u, f, t) for u, f, t in rows],
            )

    def prune_gpu_history(self, older_than: float) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM gpu_history WHERE at < ?", (older_than,))
