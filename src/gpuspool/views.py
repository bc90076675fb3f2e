"""What ``status``, ``gpus`` and ``logs`` show: the data (also their ``--json``) and rich views.

Pure functions of ledger reads and the daemon's ``gpus`` snapshot, so ``cli.py`` stays thin and
tests can render them without a terminal. Must not import torch or matplotlib.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
import unicodedata
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from gpuspool import logs
from gpuspool.fairshare import share_table, usage_by_user, usage_horizon
from gpuspool.ledger import JobRecord, Waiting, json_object
from gpuspool.ledger_api import ClusterLedger, LedgerBackend
from gpuspool.models import TERMINAL_STATES, JobState
from gpuspool.placement import stable_count
from gpuspool.spool import Spool
from gpuspool.yielding import yield_words

#: Finished jobs ``status`` lists without ``--all``.
RECENT_FINISHED = 10
PROGRESS_KEYS = ("lines_done", "lines_total", "audio_s_done", "audio_s_per_s", "eta_s",
                 "gpu_peak_gib")  # fmt: skip
STATE_STYLE = {
    "running": "bold green",
    "queued": "yellow",
    "interrupted": "yellow",
    "deferred": "yellow",
    "held": "magenta",
    "done": "green",
    "failed": "bold red",
    "cancelled": "dim",
}


def job_dict(job: JobRecord) -> dict[str, Any]:
    """The JSON shape of one job in ``status --json``, ``show`` and webhook bodies."""
    p = job.progress
    return {
        "id": job.id,
        "name": job.name,
        "state": job.state.value,
        "gpu_uuid": job.gpu_uuid,
        "priority": job.priority,
        "need_gib": job.need_gib,
        "threshold_gib": job.threshold_gib,
        "attempts": job.attempts,
        "reason": job.reason,
        "exit_class": job.exit_class,
        "submitted_at": job.submitted_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "peak_gib": job.peak_gib,
        "submitter_uid": job.submitter_uid,
        "input": job.input,
        "output": job.output,
        "progress": progress_view(p),
        "log_path": job.log_path,
        "yields": job.yields,
        "last_yield": job.last_yield,
        "yielded": _yielded_words(job.yields, job.last_yield),
    }


def _yielded_words(yields: int, last: dict[str, Any] | None) -> str | None:
    """ "yielded to pid N (user U) on GPU X at T" (and how often, after the first), or None."""
    if not yields or last is None:
        return None
    times = f" ({yields} yields)" if yields > 1 else ""
    return f"yielded to {yield_words(last)}{times}"


def progress_view(stored: str | dict[str, Any] | None) -> dict[str, Any]:
    """The progress columns, each a finite number or None. The daemon stores only validated
    worker events (gpuspool.protocol), but a ledger written by an older version may hold
    anything a worker printed."""
    if isinstance(stored, str):
        try:
            stored = json.loads(stored)
        except (ValueError, RecursionError):
            stored = None
    if not isinstance(stored, dict):
        stored = {}
    out: dict[str, Any] = {}
    for key in PROGRESS_KEYS:
        out[key] = _number(stored.get(key))
    return out


def _number(value: object) -> float | None:
    """``value`` if it is a finite number of sensible size (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if -1e15 < value < 1e15 else None  # False for NaN and the infinities


def gpus_snapshot(ledger: LedgerBackend) -> dict[str, Any]:
    """The daemon's last ``gpus`` snapshot: ``{"at": time or None, "gpus": [...]}``.

    On a shared ledger, every host's GPUs from its last heartbeat, each with its ``host``, and
    ``hosts``: each host's name, heartbeat age, version and draining flag."""
    if isinstance(ledger, ClusterLedger):
        return _cluster_snapshot(ledger)
    raw = ledger.get_meta("gpus")
    return json.loads(raw) if raw else {"at": None, "gpus": []}


def submitter_counts(
    ledger: LedgerBackend,
    waiting_jobs: Iterable[Waiting] | None = None,
    running_jobs: Iterable[JobRecord] | None = None,
) -> tuple[dict[int, int], dict[int, int]]:
    """Running and waiting (queued, deferred, interrupted, held) jobs per submitter uid.
    ``waiting_jobs``, ``running_jobs`` (of every host): those jobs if the caller has them (the
    daemon keeps them), else they are read from the ledger."""
    running: dict[int, int] = {}
    for job in ledger.jobs([JobState.RUNNING]) if running_jobs is None else running_jobs:
        running[job.submitter_uid] = running.get(job.submitter_uid, 0) + 1
    waiting: dict[int, int] = {}
    for w in ledger.waiting() if waiting_jobs is None else waiting_jobs:
        waiting[w.submitter_uid] = waiting.get(w.submitter_uid, 0) + 1
    return running, waiting


def submitters_data(ledger: LedgerBackend, now: float, half_life_s: float) -> list[dict[str, Any]]:
    """Each submitter's fair share for the root view of ``status``: user name, decayed usage
    (GPU-seconds; plain GPU-seconds of the last ten days with fair share off), share of all
    usage, running and waiting jobs."""
    from gpuspool.privileges import user_name_of

    window = half_life_s if half_life_s > 0 else 86400.0
    usage = usage_by_user(ledger.usage_runs(usage_horizon(now, window)), now, half_life_s)
    running, waiting = submitter_counts(ledger)
    rows: list[dict[str, Any]] = []
    for row in share_table(usage, running, waiting):
        rows.append({"user": user_name_of(int(row["uid"])), **row})
    return rows


def _cluster_snapshot(ledger: ClusterLedger) -> dict[str, Any]:
    now = time.time()
    hosts = list(ledger.hosts())
    gpus = [
        {**g, "host": h.name}
        for h in hosts
        if isinstance(h.gpus, list)
        for g in h.gpus
        if isinstance(g, dict)
    ]
    return {
        "at": now - min(h.age_s for h in hosts) if hosts else None,
        "gpus": gpus,
        "hosts": [
            {
                "name": h.name,
                "age_s": round(h.age_s, 1),
                "version": h.version,
                "draining": h.draining,
            }
            for h in hosts
        ],
    }


def status_data(
    ledger: LedgerBackend,
    now: float,
    *,
    all_jobs: bool = False,
    max_waiting: int | None = None,
    snap: dict[str, Any] | None = None,
    submitter_uid: int | None = None,
    fair_share_half_life_s: float | None = None,
) -> dict[str, Any]:
    """Everything ``status`` shows, as plain data (``status --json`` prints exactly this).

    ``max_waiting`` lists only the first waiting jobs (by start order); ``hidden_waiting``
    counts the rest. ``snap`` is the :func:`gpus_snapshot` if the caller has read it already.
    With ``fair_share_half_life_s`` (the root view only: it names every submitter),
    ``submitters`` lists each one's share and running and waiting jobs.
    """
    rows = ledger.status_rows(
        finished_limit=None if all_jobs else RECENT_FINISHED,
        waiting_limit=max_waiting,
        submitter_uid=submitter_uid,
    )
    if snap is None:
        snap = gpus_snapshot(ledger)
    index = {g["uuid"]: g["index"] for g in snap["gpus"]}
    waiting_states = {s.value for s in JobState if s.runnable} | {JobState.HELD.value}
    out = []
    for row in rows:
        row["progress"] = progress_view(row.pop("progress_json"))
        row["last_yield"] = json_object(row.pop("last_yield_json", None))
        row["yields"] = int(row.get("yields") or 0)
        row["yielded"] = _yielded_words(row["yields"], row["last_yield"])
        row["gpu_index"] = index.get(row["gpu_uuid"] or "")
        row["waiting_for"] = row["reason"] if row["state"] in waiting_states else None
        end = row["finished_at"] if row["state"] in TERMINAL_VALUES else now
        started = row["started_at"]
        row["elapsed_s"] = None if started is None else max(0.0, (end or now) - started)
        del row["seq"], row["updated_at"]
        out.append(row)
    counts = dict.fromkeys((s.value for s in JobState), 0)
    counts.update(ledger.counts())
    listed_waiting = sum(1 for r in out if r["state"] in waiting_states)
    data = {
        "hidden_waiting": sum(counts[s] for s in waiting_states) - listed_waiting,
        "at": now,
        "draining": ledger.draining(),
        "last_tick": snap["at"],
        "counts": counts,
        "jobs": out,
    }
    if fair_share_half_life_s is not None and submitter_uid is None:
        data["submitters"] = submitters_data(ledger, now, fair_share_half_life_s)
    return data


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


#: Invisible characters that reorder text on a terminal (bidi overrides and isolates).
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f")


def safe(value: object) -> str:
    """``value`` as text a terminal shows as it is: control characters (ESC, newline, tab,
    C1 codes) and bidi overrides are written as escapes (``\\x1b``), never sent raw.

    Every string a user or a worker controls (job names, reasons, paths, log fields) passes
    through this before it is printed; rich markup is avoided separately by printing such
    strings as :class:`rich.text.Text`, never as markup.
    """
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable() or (ch == " "):
            out.append(ch)
        elif unicodedata.category(ch) in ("Cc", "Cs") or ch in _BIDI or ch in "\u2028\u2029":
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:  # other invisible characters (e.g. zero-width joiners in emoji) are harmless
            out.append(ch)
    return "".join(out)


def plain(value: object) -> Text:
    """A user-controlled string as rich text: escaped, and never parsed as markup."""
    return Text(safe(value))


@dataclass(frozen=True, slots=True)
class _Column:
    """A table column and how it yields to a narrow terminal.

    ``drop``: the order in which columns are left out when the table does not fit (lower goes
    last; 0 is never dropped: ids and states). ``shrink``: the column may wrap down to
    ``min_width`` cells instead of being dropped.
    """

    header: str
    drop: int
    shrink: bool = False
    min_width: int = 0


def _cell_width(cell: RenderableType) -> int:
    if isinstance(cell, Text):
        return max((Text(line).cell_len for line in cell.plain.split("\n")), default=0)
    if isinstance(cell, ProgressBar):
        return cell.width or 20
    return len(str(cell))


def _fit_table(
    columns: list[_Column], rows: list[list[RenderableType]], width: int | None
) -> Table:
    """A borderless table of ``rows`` that fits in ``width`` cells.

    Columns are left out, most droppable first, until the rest fit; ids and states are never
    left out nor cut (they fold onto a second line only when even they do not fit).
    """
    natural = [
        max([len(c.header), *(_cell_width(r[i]) for r in rows)]) for i, c in enumerate(columns)
    ]
    keep = list(range(len(columns)))

    def needed(idx: list[int]) -> int:
        widths = [
            min(natural[i], columns[i].min_width) if columns[i].shrink else natural[i] for i in idx
        ]
        return sum(widths) + 2 * (len(idx) - 1)  # a column is padded by one cell each side

    if width is not None:
        for i in sorted(keep, key=lambda i: -columns[i].drop):
            if needed(keep) <= width or columns[i].drop == 0:
                break
            keep.remove(i)
    table = Table(box=None, pad_edge=False, header_style="bold", expand=False)
    for i in keep:
        col = columns[i]
        if col.shrink:
            table.add_column(col.header, min_width=min(natural[i], col.min_width))
        else:
            table.add_column(col.header, no_wrap=True, min_width=natural[i], overflow="fold")
    for row in rows:
        table.add_row(*(row[i] for i in keep))
    return table


def _status_head(data: dict[str, Any], poll_interval_s: float) -> Text:
    c = data["counts"]
    waiting = c["queued"] + c["interrupted"] + c["deferred"]
    head = Text.assemble(
        ("gpuspool  ", "bold"),
        (f"{c['running']} running", "green"),
        f", {waiting} waiting, {c['held']} held, {c['done']} done, ",
        (f"{c['failed']} failed", "red" if c["failed"] else ""),
    )
    if data["draining"]:
        head.append("  DRAINING: no new jobs start (gpuspool resume)", "bold yellow")
    if data["last_tick"] is None:
        head.append("  daemon has not run yet", "bold red")
    else:
        age = data["at"] - data["last_tick"]
        stale = age > max(3 * poll_interval_s, 15.0)
        head.append(
            f"  last tick {_duration(age)} ago" + (" (daemon not running?)" if stale else ""),
            "bold red" if stale else "dim",
        )
    return head


def _yielded_briefly(job: dict[str, Any]) -> str | None:
    """The last yield for a terminal's narrow "why" column: "yielded to pid N (user U) at
    HH:MM:SS", local time like the rest of the view; the GPU is in the reason beside it, and
    the pipe and ``--json`` keep the full words."""
    last, yields = job.get("last_yield"), job.get("yields")
    if not isinstance(last, dict) or not isinstance(yields, int) or yields < 1:
        return job.get("yielded")
    pid = last.get("pid")
    who = "others' processes" if pid is None else f"pid {pid} (user {last.get('user') or '?'})"
    at = last.get("at")
    when = (
        f" at {time.strftime('%H:%M:%S', time.localtime(at))}"
        if isinstance(at, int | float)
        else ""
    )
    times = f" ({yields} yields)" if yields > 1 else ""
    return f"yielded to {who}{when}{times}"


def _job_cells(job: dict[str, Any], *, terminal: bool = False) -> dict[str, Any]:
    """One job's status cells as plain strings (and the progress fraction for a bar);
    ``terminal``: the shorter words of the table on a terminal."""
    p = job["progress"]
    done, total = p.get("lines_done"), p.get("lines_total")
    running = job["state"] == "running"
    lines = ""
    fraction = None
    if isinstance(done, int):
        lines = f"{done}/{total}" if total else str(done)
        if isinstance(total, int) and total > 0:
            lines += f" {100.0 * done / total:.0f}%"
            if running or job["state"] == "done":
                fraction = (float(done), float(total))
    rate = p.get("audio_s_per_s")
    peak = p.get("gpu_peak_gib") if running else job["peak_gib"]
    gpu = ""
    if job["gpu_uuid"] and (running or job["state"] in TERMINAL_VALUES):
        short = safe(job["gpu_uuid"])[:12]
        gpu = f"{job['gpu_index']} {short}" if job["gpu_index"] is not None else short
        if job.get("host"):  # a shared ledger: `host:index`, as `gpuspool gpus` names it,
            # short enough to keep the column at 80 columns (the UUID is in `--json`)
            where = short if job["gpu_index"] is None else job["gpu_index"]
            gpu = f"{safe(job['host'])}:{where}"
    if job["state"] in ("running", "done"):
        note = _running_note(job.get("reason")) if running else f"in {_duration(job['elapsed_s'])}"
    else:
        note = safe(job["reason"] or "")
    yielded = _yielded_briefly(job) if terminal else job.get("yielded")
    if yielded and job["state"] not in TERMINAL_VALUES:
        note = f"{note}; {safe(yielded)}" if note else safe(yielded)
    eta = p.get("eta_s") if running else None
    return {
        "id": safe(job["id"]),
        "name": safe(job["name"] or ""),
        "state": safe(job["state"]),
        "gpu": gpu,
        "fraction": fraction,
        "lines": lines,
        "rate": f"{rate:.1f}" if isinstance(rate, (int, float)) else "",
        "eta": _duration(eta) if isinstance(eta, (int, float)) else "",
        "peak": f"{peak:.1f} GiB" if isinstance(peak, (int, float)) else "",
        "note": note,
    }


def _running_note(reason: object) -> str:
    """What a running job's reason says beyond "running on GPU" (e.g. that it no longer
    yields: ``max_yields``), escaped; empty for the plain one."""
    if not isinstance(reason, str) or not reason.startswith("running on ") or "; " not in reason:
        return ""
    return safe(reason.split("; ", 1)[1])


def _listed_jobs(data: dict[str, Any], max_waiting: int | None) -> tuple[list[dict[str, Any]], int]:
    """The jobs to list (at most ``max_waiting`` waiting ones) and how many waiting are not."""
    hidden = int(data.get("hidden_waiting", 0))
    shown: list[dict[str, Any]] = []
    waiting_shown = 0
    for job in data["jobs"]:
        if job["waiting_for"] is not None:
            waiting_shown += 1
            if max_waiting is not None and waiting_shown > max_waiting:
                hidden += 1
                continue
        shown.append(job)
    return shown, hidden


STATUS_COLUMNS = [
    _Column("id", 0),
    _Column("state", 0),
    _Column("name", 3, shrink=True, min_width=10),
    _Column("GPU", 5),
    _Column("progress", 9),
    _Column("lines", 4),
    _Column("audio-s/s", 8),
    _Column("ETA", 6),
    _Column("peak", 7),
    _Column("why waiting / result", 2, shrink=True, min_width=20),
]


def shares_line(submitters: list[dict[str, Any]]) -> str:
    """``shares: alice 62% (2 running, 5 waiting) · bob 38% (...)``: each submitter's share of
    the recent GPU usage that fair share orders by (escaped: user names are the system's, but
    a uid without a name shows as a number)."""
    parts = [
        f"{safe(str(row.get('user')))} {100.0 * float(row.get('share') or 0.0):.0f}%"
        f" ({row.get('running', 0)} running, {row.get('waiting', 0)} waiting)"
        for row in submitters
    ]
    return "shares: " + " · ".join(parts)


def status_view(
    data: dict[str, Any],
    *,
    poll_interval_s: float = 5.0,
    max_waiting: int | None = 40,
    width: int | None = None,
) -> RenderableType:
    """A header line and a table with a progress bar per running job.

    ``width``: the terminal's width; columns are left out until the table fits, never the id
    or the state (None: every column).
    """
    head: RenderableType = _status_head(data, poll_interval_s)
    if data.get("submitters"):
        head = Group(head, Text(shares_line(data["submitters"]), "dim"))
    if not data["jobs"]:
        return Group(head, Text("no jobs", "dim"))
    jobs, hidden = _listed_jobs(data, max_waiting)
    rows: list[list[RenderableType]] = []
    for job in jobs:
        c = _job_cells(job, terminal=True)
        bar: RenderableType = ""
        if c["fraction"] is not None:
            done, total = c["fraction"]
            bar = ProgressBar(total=total, completed=done, width=20)
        rows.append([
            Text(c["id"]), Text(c["state"], STATE_STYLE.get(job["state"], "")), Text(c["name"]),
            Text(c["gpu"]), bar, Text(c["lines"]), Text(c["rate"]), Text(c["eta"]),
            Text(c["peak"]), Text(c["note"]),
        ])  # fmt: skip
    table = _fit_table(STATUS_COLUMNS, rows, width)
    if hidden:
        more = Text(f"… and {hidden} more waiting jobs (gpuspool status --all-waiting)", "dim")
        return Group(head, table, more)
    return Group(head, table)


def status_lines(data: dict[str, Any], *, poll_interval_s: float = 5.0) -> list[str]:
    """``status`` for a pipe: one job per line, tab-separated, every field complete.

    Columns: id, state, GPU, lines, audio-s/s, ETA, peak, name, why waiting / result (an empty
    field is ``-``); header lines start with ``#``. ``awk '$2 == "queued"'`` and
    ``grep -c queued`` work on it; user strings are escaped, so no field holds a tab or newline.
    """
    head = _status_head(data, poll_interval_s).plain
    out = [f"# {head}", "# id\tstate\tgpu\tlines\taudio_s_per_s\teta\tpeak\tname\twhy"]
    jobs, hidden = _listed_jobs(data, None)
    for job in jobs:
        c = _job_cells(job)
        fields = [c["id"], c["state"], c["gpu"], c["lines"], c["rate"], c["eta"], c["peak"],
                  c["name"], c["note"]]  # fmt: skip
        out.append("\t".join(f or "-" for f in fields))
    if hidden:
        out.append(f"# {hidden} more waiting jobs not in the published snapshot")
    return out


TERMINAL_VALUES = {s.value for s in TERMINAL_STATES}


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def gpus_data(
    snap: dict[str, Any],
    running: list[JobRecord],
    threshold_gib: float,
    stable_polls: int,
    *,
    host_timeout_s: float | None = None,
) -> dict[str, Any]:
    """Each GPU with what it means for placement, and its processes with ours marked.

    A process is ours when it is a running job's worker or in its process group (the worker
    starts its own session, so everything it spawns shares the group). On a shared ledger,
    ``hosts`` too, each marked ``silent`` when its heartbeat is older than ``host_timeout_s``:
    its GPUs are then as it last reported them, and its jobs move to the other hosts.
    """
    gpus = []
    for g in snap["gpus"]:
        here = [j for j in running if g.get("host") is None or j.host == g["host"]]
        by_pid = {j.pid: j for j in here if j.pid is not None}
        available = g["free_mib"] / 1024.0 - g.get("reserved_gib", 0.0)
        stable = stable_count(g.get("history", []), threshold_gib)
        procs = []
        for p in g.get("processes", []):
            job = by_pid.get(p["pid"]) or by_pid.get(_pgid(p["pid"]) or -1)
            procs.append({**p, "job_id": job.id if job else None, "job_name": job and job.name})
        gpus.append(
            {
                **g,
                "available_gib": round(available, 2),
                "meets_threshold": bool(g["healthy"] and available >= threshold_gib),
                "stable_polls": stable,
                "processes": procs,
            }
        )
    data: dict[str, Any] = {
        "at": snap["at"],
        "threshold_gib": threshold_gib,
        "stable_polls_needed": stable_polls,
        "gpus": gpus,
    }
    if "hosts" in snap:  # a shared ledger: each host's heartbeat age, for `gpus --json`
        data["hosts"] = [
            {**h, "silent": host_timeout_s is not None and h["age_s"] > host_timeout_s}
            for h in snap["hosts"]
        ]
    return data


def _gpus_head(data: dict[str, Any], now: float) -> Text:
    t = data["threshold_gib"]
    k = data["stable_polls_needed"]
    head = Text.assemble(
        ("GPUs  ", "bold"), f"threshold {t:g} GiB free (default), stable {k} polls"
    )
    if data["at"] is None:
        head.append("  no reading yet (is the daemon running?)", "bold red")
    else:
        head.append(f"  as of {time.strftime('%H:%M:%S', time.localtime(data['at']))}", "dim")
        head.append(f" ({_duration(now - data['at'])} ago)", "dim")
    return head


def _silent_hosts(data: dict[str, Any]) -> list[str]:
    """A line per host silent past ``host_timeout_s``: "as of" is the newest heartbeat, so
    without it a dead host's GPUs would look as fresh as the others'."""
    return [
        f"host {safe(h['name'])}: silent for {_duration(h['age_s'])}; its GPUs as it last"
        " reported them, its jobs move to the other hosts"
        for h in data.get("hosts", [])
        if h.get("silent")
    ]


def _gpu_index(g: dict[str, Any]) -> str:
    """A GPU's index; ``host:index`` on a shared ledger, where every host has a GPU 0."""
    return f"{safe(g['host'])}:{safe(g['index'])}" if g.get("host") else safe(g["index"])


def _proc_label(p: dict[str, Any]) -> str:
    used = p.get("used_mib")
    size = f"{used / 1024:.1f} GiB" if isinstance(used, (int, float)) else "? GiB"
    if p.get("job_id"):
        return f"★ {p['pid']} {size} job {safe(p.get('job_name') or p['job_id'])}"
    return f"  {p['pid']} {size}"


GPU_COLUMNS = [
    _Column("#", 0),
    _Column("uuid", 0),
    _Column("name", 6, shrink=True, min_width=8),
    _Column("free / total GiB", 1),
    _Column("memory", 7),
    _Column("reserved", 4),
    _Column("fits", 2),
    _Column("stable", 3),
    _Column("processes", 5, shrink=True, min_width=16),
]


def gpus_view(data: dict[str, Any], now: float, *, width: int | None = None) -> RenderableType:
    """One row per GPU; processes listed under it, ours marked ★ with the job.

    ``width``: the terminal's width; columns are left out until the table fits, never the
    index or the UUID.
    """
    k = data["stable_polls_needed"]
    rows: list[list[RenderableType]] = []
    for g in data["gpus"]:
        index, uuid, name = Text(_gpu_index(g)), Text(safe(g["uuid"])), plain(g["name"])
        if not g["healthy"]:
            err = Text(f"ERROR {safe(g.get('error'))}", "bold red")
            rows.append([index, uuid, name, err, "", Text(""), Text("no", "red"), Text(""),
                         Text("")])  # fmt: skip
            continue
        total = g["total_mib"] / 1024.0
        free = g["free_mib"] / 1024.0
        procs = Text()
        for i, p in enumerate(g["processes"]):
            if i:
                procs.append("\n")
            procs.append(_proc_label(p), "green" if p["job_id"] else "")
        rows.append([
            index, uuid, name, Text(f"{free:.1f} / {total:.1f}"),
            ProgressBar(total=total or 1.0, completed=total - free, width=16),
            Text(f"{g.get('reserved_gib', 0.0):.1f}"),
            Text("yes", "green") if g["meets_threshold"] else Text("no", "yellow"),
            Text(f"{g['stable_polls']}/{k}"), procs,
        ])  # fmt: skip
    table = _fit_table(GPU_COLUMNS, rows, width)
    foot = Text("★ = a gpuspool job's process", "dim")
    silent = [Text(line, "bold red") for line in _silent_hosts(data)]
    return Group(_gpus_head(data, now), *silent, table, foot)


def gpus_lines(data: dict[str, Any], now: float) -> list[str]:
    """``gpus`` for a pipe: one GPU per line, tab-separated, every field complete.

    Columns: index, uuid, free GiB, total GiB, reserved GiB, fits, stable, name, processes
    (``pid:GiB`` or ``pid:GiB:job=ID``, space-separated); an empty field is ``-``.
    """
    k = data["stable_polls_needed"]
    out = [
        f"# {_gpus_head(data, now).plain}",
        "# index\tuuid\tfree_gib\ttotal_gib\treserved_gib\tfits\tstable\tname\tprocesses",
    ]
    for g in data["gpus"]:
        head = [_gpu_index(g), safe(g["uuid"])]
        if not g["healthy"]:
            fields = [*head, "-", "-", "-", "no", "-", safe(g["name"]),
                      f"ERROR {safe(g.get('error'))}"]  # fmt: skip
        else:
            procs = []
            for p in g["processes"]:
                used = p.get("used_mib")
                size = f"{used / 1024:.1f}" if isinstance(used, (int, float)) else "?"
                job = f":job={safe(p['job_id'])}" if p.get("job_id") else ""
                procs.append(f"{p['pid']}:{size}{job}")
            fields = [
                *head, f"{g['free_mib'] / 1024:.1f}", f"{g['total_mib'] / 1024:.1f}",
                f"{g.get('reserved_gib', 0.0):.1f}", "yes" if g["meets_threshold"] else "no",
                f"{g['stable_polls']}/{k}", safe(g["name"]), " ".join(procs),
            ]  # fmt: skip
        out.append("\t".join(f or "-" for f in fields))
    out.extend(f"# {line}" for line in _silent_hosts(data))  # after the rows: lines[2:] stay GPUs
    return out


def log_line(raw: str) -> Text:
    """One line of a job's log, for a terminal: time, source, event and its fields.

    Every value is escaped (:func:`safe`): the worker's output is the user's, and must not
    move the cursor or recolour the terminal of whoever reads the log.
    """
    raw = raw.rstrip("\n")
    event = _json_object(raw)
    if event is None:
        return Text(safe(raw), "dim")
    fields = dict(event)
    name = safe(fields.pop("event", "?"))
    source = safe(fields.pop("source", "worker"))
    stamp = _clock(fields.pop("timestamp", fields.pop("ts", None)))
    style = "red" if name in ("error", "job_failed") else ("green" if name in (
        "summary", "job_finished") else "")  # fmt: skip
    line = Text(f"{stamp:8} ", "dim")
    line.append(f"{source:6} ", "magenta" if source == "daemon" else "cyan")
    line.append(name, f"bold {style}".strip())
    done, total = fields.get("lines_done") or 0, fields.get("lines_total")
    if name == "progress" and _count(done) and _count(total) and total:
        del fields["lines_total"]
        fields.pop("lines_done", None)
        line.append(f" {done}/{total} ({100.0 * done / max(total, 1):.0f}%)")
    for key, value in fields.items():
        if value is None or key in ("job_id", "argv"):
            continue
        if isinstance(value, float):
            value = round(value, 2)
        line.append(f" {safe(key)}=", "dim")
        line.append(safe(value if isinstance(value, str) else json.dumps(value, default=str)))
    return line


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**15


def _json_object(raw: str) -> dict[str, Any] | None:
    """``raw`` as a JSON object, or None. A job's log holds whatever its worker printed, so
    anything (deep nesting included) is just text."""
    return json_object(raw) if raw.startswith("{") else None


def _clock(ts: object) -> str:
    """``HH:MM:SS`` (local) of an epoch or ISO 8601 timestamp; empty if it is neither."""
    seconds = logs.parse_timestamp(ts)
    if seconds is None:
        return ""
    try:
        return time.strftime("%H:%M:%S", time.localtime(seconds))
    except (OverflowError, OSError, ValueError):
        return ""


def log_json(raw: str) -> str:
    """One line of a job's log as JSON (a line the worker printed that is not JSON is wrapped)."""
    raw = raw.rstrip("\n")
    event = _json_object(raw)
    if event is not None:
        # JSON may hold C1 codes or bidi overrides unescaped; re-encoded, they are \uXXXX.
        return raw if raw.isascii() else json.dumps(event)
    return json.dumps({"event": "output", "source": "worker", "line": raw})


#: Longest line of a job's log that ``logs`` shows; the rest of a longer line is cut.
MAX_LOG_LINE = 64 << 10


class LogLines:
    """The lines of a job's log as it is read, each at most :data:`MAX_LOG_LINE` bytes.

    A job's log belongs to its submitter, who may write anything into it (gigabytes without a
    newline, a sparse file of NUL bytes): the cut part of a line is counted, not kept, so
    reading costs memory bounded by one line and time linear in the bytes read.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._cut = 0

    def feed(self, chunk: bytes) -> list[str]:
        """The lines that ``chunk`` completes."""
        out = []
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            self._add(chunk, start, end)
            out.append(self._take())
            start = end + 1
        self._add(chunk, start, len(chunk))
        return out

    def rest(self) -> list[str]:
        """The last line, if the log does not end with a newline."""
        return [self._take()] if self._buf or self._cut else []

    def _add(self, chunk: bytes, start: int, end: int) -> None:
        keep = min(end - start, MAX_LOG_LINE - len(self._buf))
        self._buf += chunk[start : start + keep]
        self._cut += end - start - keep

    def _take(self) -> str:
        text = self._buf.decode("utf-8", errors="replace")
        if self._cut:
            text += f" [... {self._cut} more bytes of this line cut]"
        self._buf, self._cut = bytearray(), 0
        return text


#: Waiting jobs listed in the published snapshot (the rest are counted).
SNAPSHOT_WAITING = 200
#: What the public snapshot hides of a job: what it is, whose it is, where its files are, its
#: need (derived from its audio), and reasons (which may quote paths or errors). Its submitter
#: sees them in their own snapshot.
PRIVATE_JOB_KEYS = ("name", "submitter_uid", "input", "output", "log_path", "reason",
                    "waiting_for", "exit_class", "need_gib", "last_yield", "yielded")  # fmt: skip
#: The per-user snapshots' folder, beside ``status.json``.
USERS_DIR = "users"
#: Rejections listed per user (newest), and ``.reason`` files read per publish at most.
USER_REJECTIONS = 20
REASONS_PER_PUBLISH = 1000


def anonymised(job: dict[str, Any]) -> dict[str, Any]:
    """A job as everyone may see it: id, state, GPU, progress, threshold and times; the keys
    :data:`PRIVATE_JOB_KEYS` are kept but empty, so every view renders either shape."""
    return {**job, **{k: None for k in PRIVATE_JOB_KEYS if k in job}}


def _anonymised_gpus(gpus: dict[str, Any]) -> dict[str, Any]:
    out = []
    for g in gpus["gpus"]:
        procs = [{**p, "job_name": None} for p in g.get("processes", [])]
        out.append({**g, "processes": procs})
    return {**gpus, "gpus": out}


class SnapshotPublisher:
    """Publishes what ``status`` and ``gpus`` show for users who may not open the ledger.

    - ``status/status.json`` (0640, the spool's group): every job anonymised
      (:func:`anonymised`), the GPUs without job names;
    - ``status/users/<uid>.json`` (0400, owned by that user; the folder is 0711 so nobody can
      list it): that user's own jobs in full (running, the first ``SNAPSHOT_WAITING`` waiting,
      the latest finished), rewritten only when one of them changed;
    - each listed job's log is handed to its submitter (owner, mode 0600), so ``gpuspool logs``
      works for them in the 0711 logs folder;
    - each user's latest rejections (the ``.reason`` file's name and text; the file itself is
      theirs, 0400, in the 0711 ``rejected/``), found by reading only new ``.reason`` files.

    Files are written beside their final name and renamed over it (atomic), opened relative to
    the folder without following links. Runs on the tick's thread with the tick's ledger.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._marks: dict[int, tuple[float, int]] = {}
        self._rejected_mtime: int | None = None
        self._seen_reasons: set[str] = set()
        self._rejections: dict[int, deque[dict[str, str]]] = {}

    def publish(
        self,
        ledger: LedgerBackend,
        now: float,
        *,
        threshold_gib: float,
        stable_polls: int,
        spool: Spool | None = None,
    ) -> None:
        snap = gpus_snapshot(ledger)
        status = status_data(ledger, now, max_waiting=SNAPSHOT_WAITING, snap=snap)
        gpus = gpus_data(snap, ledger.jobs([JobState.RUNNING]), threshold_gib, stable_polls)
        public = {
            "status": {**status, "jobs": [anonymised(j) for j in status["jobs"]]},
            "gpus": _anonymised_gpus(gpus),
        }
        folder = self.path.parent
        if not folder.is_dir():
            folder.mkdir(mode=0o750, parents=True, exist_ok=True)
            folder.chmod(0o750)  # whatever the daemon's umask
            if os.geteuid() == 0:
                os.chown(folder, 0, folder.parent.stat().st_gid)
        gid = folder.stat().st_gid if os.geteuid() == 0 else -1
        _write_replace(folder, self.path.name, json.dumps(public).encode(), 0o640, 0, gid)
        users = folder / USERS_DIR
        if not users.is_dir():
            users.mkdir(mode=0o711, exist_ok=True)
            users.chmod(0o711)
        rejected_by = self._new_rejections(spool) if spool is not None else set()
        marks = ledger.submitters()
        for uid in sorted(set(marks) | rejected_by):
            mark = marks.get(uid, (0.0, 0))
            if self._marks.get(uid) == mark and uid not in rejected_by:
                continue
            own = status_data(
                ledger, now, max_waiting=SNAPSHOT_WAITING, snap=snap, submitter_uid=uid
            )
            rejections = [r for r in self._rejections.get(uid, ()) if r["name"] in
                          self._seen_reasons]  # fmt: skip
            data = {"uid": uid, "at": now, "jobs": own["jobs"], "rejected": rejections[::-1]}
            _write_replace(users, f"{uid}.json", json.dumps(data).encode(), 0o400, uid, -1)
            self._marks[uid] = mark
            for job in own["jobs"]:
                self._share_log(job.get("log_path"), uid)

    def _new_rejections(self, spool: Spool) -> set[int]:
        """Read the ``.reason`` files new since the last look (only when ``rejected/`` changed);
        the uids they belong to."""
        try:
            mtime = os.stat(spool.rejected).st_mtime_ns
        except OSError:
            return set()
        if mtime == self._rejected_mtime:
            return set()
        self._rejected_mtime = mtime
        names = spool.reason_names()
        new = sorted(n for n in names if n not in self._seen_reasons)[-REASONS_PER_PUBLISH:]
        self._seen_reasons = set(names)  # forgets what was pruned
        owners = set()
        for name, uid, text in spool.reasons_of(new):
            recent = self._rejections.setdefault(uid, deque(maxlen=USER_REJECTIONS))
            recent.append({"name": name, "reason_file": str(spool.rejected / name), "text": text})
            owners.add(uid)
        return owners

    def _share_log(self, log_path: str | None, uid: int) -> None:
        """Make a job's log its submitter's, when the daemon is root."""
        if not log_path or os.geteuid() != 0:
            return
        try:
            fd = os.open(log_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return  # not written yet: next time
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and (st.st_uid, stat.S_IMODE(st.st_mode)) != (uid, 0o600):
                os.fchown(fd, uid, -1)
                os.fchmod(fd, 0o600)
        finally:
            os.close(fd)


def _write_replace(folder: Path, name: str, content: bytes, mode: int, uid: int, gid: int) -> None:
    """Write ``folder/name`` atomically: a new file (never following a link) renamed over it."""
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        tmp = f".{name}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dfd)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600, dir_fd=dfd)
        try:
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view) :]
            if os.geteuid() == 0:
                os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    finally:
        os.close(dfd)


def publish_snapshot(
    path: Path, ledger: LedgerBackend, now: float, *, threshold_gib: float, stable_polls: int
) -> None:
    """Publish the snapshots once (see :class:`SnapshotPublisher`)."""
    SnapshotPublisher(path).publish(
        ledger, now, threshold_gib=threshold_gib, stable_polls=stable_polls
    )


def read_snapshot(path: Path, uid: int | None = None) -> dict[str, Any] | None:
    """The last published snapshot, or None if there is none (or it cannot be read).

    With ``uid``, that user's own jobs (``users/<uid>.json``, if readable) replace their
    anonymised rows, those not in the public list (it lists the first waiting jobs only) are
    added, and their latest rejections are ``status.rejections``.
    """
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if uid is None or not isinstance(data.get("status"), dict):
        return data
    try:
        own = json.loads((path.parent / USERS_DIR / f"{uid}.json").read_text(encoding="utf-8"))
        mine = {j["id"]: j for j in own["jobs"]}
    except (OSError, ValueError, KeyError, TypeError):
        return data
    jobs = data["status"].get("jobs", [])
    listed = {j.get("id") for j in jobs}
    merged = [mine.get(j.get("id"), j) for j in jobs]
    extra = [j for i, j in mine.items() if i not in listed and j.get("state") not in
             TERMINAL_VALUES]  # fmt: skip
    status = data["status"]
    status["jobs"] = merged + extra
    status["hidden_waiting"] = max(0, int(status.get("hidden_waiting") or 0) - len(extra))
    status["rejections"] = own.get("rejected", [])
    data["own_jobs"] = own["jobs"]
    return data
