"""What ``status``, ``gpus`` and ``logs`` show: the data (also their ``--json``) and rich views.

Pure functions of ledger reads and the daemon's ``gpus`` snapshot, so ``cli.py`` stays thin and
tests can render them without a terminal. Must not import torch or matplotlib.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from gpuspool.ledger import JobRecord, Ledger
from gpuspool.models import TERMINAL_STATES, JobState
from gpuspool.placement import stable_count

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
    }


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


def gpus_snapshot(ledger: Ledger) -> dict[str, Any]:
    """The daemon's last ``gpus`` snapshot: ``{"at": time or None, "gpus": [...]}``."""
    raw = ledger.get_meta("gpus")
    return json.loads(raw) if raw else {"at": None, "gpus": []}


def status_data(
    ledger: Ledger,
    now: float,
    *,
    all_jobs: bool = False,
    max_waiting: int | None = None,
    snap: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything ``status`` shows, as plain data (``status --json`` prints exactly this).

    ``max_waiting`` lists only the first waiting jobs (by start order); ``hidden_waiting``
    counts the rest. ``snap`` is the :func:`gpus_snapshot` if the caller has read it already.
    """
    rows = ledger.status_rows(
        finished_limit=None if all_jobs else RECENT_FINISHED, waiting_limit=max_waiting
    )
    if snap is None:
        snap = gpus_snapshot(ledger)
    index = {g["uuid"]: g["index"] for g in snap["gpus"]}
    waiting_states = {s.value for s in JobState if s.runnable} | {JobState.HELD.value}
    out = []
    for row in rows:
        row["progress"] = progress_view(row.pop("progress_json"))
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
    return {
        "hidden_waiting": sum(counts[s] for s in waiting_states) - listed_waiting,
        "at": now,
        "draining": ledger.draining(),
        "last_tick": snap["at"],
        "counts": counts,
        "jobs": out,
    }


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def status_view(
    data: dict[str, Any], *, poll_interval_s: float = 5.0, max_waiting: int | None = 40
) -> RenderableType:
    """A header line and a table with a progress bar per running job."""
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
    table = Table(expand=False, pad_edge=False, box=None, header_style="bold")
    for col in ("id", "name", "state", "GPU", "progress", "lines", "audio-s/s", "ETA", "peak",
                "why waiting / result"):  # fmt: skip
        table.add_column(col, no_wrap=col not in ("why waiting / result", "name"))
    waiting_shown = 0
    hidden = data.get("hidden_waiting", 0)
    for job in data["jobs"]:
        if job["waiting_for"] is not None:
            waiting_shown += 1
            if max_waiting is not None and waiting_shown > max_waiting:
                hidden += 1
                continue
        p = job["progress"]
        done, total = p.get("lines_done"), p.get("lines_total")
        running = job["state"] == "running"
        bar: RenderableType = ""
        lines = ""
        if done is not None:
            lines = f"{done}/{total}" if total else str(done)
            if total:
                lines += f" {100.0 * done / max(total, 1):.0f}%"
                if running or job["state"] == "done":
                    bar = ProgressBar(total=float(total), completed=float(done), width=20)
        rate = p.get("audio_s_per_s")
        peak = p.get("gpu_peak_gib") if running else job["peak_gib"]
        gpu = ""
        if job["gpu_uuid"]:
            short = job["gpu_uuid"][:12]
            gpu = f"{job['gpu_index']} {short}" if job["gpu_index"] is not None else short
        if job["state"] in ("running", "done"):
            note = "" if running else f"in {_duration(job['elapsed_s'])}"
        else:
            note = job["reason"] or ""
        table.add_row(
            job["id"],
            job["name"] or "",
            Text(job["state"], STATE_STYLE.get(job["state"], "")),
            gpu if running or job["state"] in TERMINAL_VALUES else "",
            bar,
            lines,
            f"{rate:.1f}" if isinstance(rate, (int, float)) else "",
            _duration(p.get("eta_s")) if running else "",
            f"{peak:.1f} GiB" if isinstance(peak, (int, float)) else "",
            note,
        )
    if not data["jobs"]:
        return Group(head, Text("no jobs", "dim"))
    if hidden:
        more = Text(f"… and {hidden} more waiting jobs (gpuspool status --all-waiting)", "dim")
        return Group(head, table, more)
    return Group(head, table)


TERMINAL_VALUES = {s.value for s in TERMINAL_STATES}


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def gpus_data(
    snap: dict[str, Any], running: list[JobRecord], threshold_gib: float, stable_polls: int
) -> dict[str, Any]:
    """Each GPU with what it means for placement, and its processes with ours marked.

    A process is ours when it is a running job's worker or in its process group (the worker
    starts its own session, so everything it spawns shares the group).
    """
    by_pid = {j.pid: j for j in running if j.pid is not None}
    gpus = []
    for g in snap["gpus"]:
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
    return {
        "at": snap["at"],
        "threshold_gib": threshold_gib,
        "stable_polls_needed": stable_polls,
        "gpus": gpus,
    }


def gpus_view(data: dict[str, Any], now: float) -> RenderableType:
    """One row per GPU; processes listed under it, ours marked ★ with the job."""
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
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("#", "uuid", "name", "free / total GiB", "memory", "reserved", "fits", "stable",
                "processes"):  # fmt: skip
        table.add_column(col, no_wrap=col != "processes")
    for g in data["gpus"]:
        if not g["healthy"]:
            table.add_row(str(g["index"]), g["uuid"], g["name"], Text(f"ERROR {g.get('error')}",
                          "bold red"), "", "", Text("no", "red"), "", "")  # fmt: skip
            continue
        total = g["total_mib"] / 1024.0
        free = g["free_mib"] / 1024.0
        procs = Text()
        for i, p in enumerate(g["processes"]):
            if i:
                procs.append("\n")
            used = p.get("used_mib")
            size = f"{used / 1024:.1f} GiB" if isinstance(used, (int, float)) else "? GiB"
            if p["job_id"]:
                procs.append(f"★ {p['pid']} {size} job {p['job_name'] or p['job_id']}", "green")
            else:
                procs.append(f"  {p['pid']} {size}")
        table.add_row(
            str(g["index"]),
            g["uuid"],
            g["name"],
            f"{free:.1f} / {total:.1f}",
            ProgressBar(total=total or 1.0, completed=total - free, width=16),
            f"{g.get('reserved_gib', 0.0):.1f}",
            Text("yes", "green") if g["meets_threshold"] else Text("no", "yellow"),
            f"{g['stable_polls']}/{k}",
            procs,
        )
    foot = Text("★ = a gpuspool job's process", "dim")
    return Group(head, table, foot)


def log_line(raw: str) -> Text:
    """One line of a job's log, for a terminal: time, source, event and its fields."""
    raw = raw.rstrip("\n")
    event = _json_object(raw)
    if event is None:
        return Text(raw, "dim")
    fields = dict(event)
    name = str(fields.pop("event", "?"))
    source = str(fields.pop("source", "worker"))
    ts = fields.pop("ts", None)
    stamp = _clock(ts)
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
        line.append(f" {key}=", "dim")
        line.append(value if isinstance(value, str) else json.dumps(value, default=str))
    return line


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**15


def _json_object(raw: str) -> dict[str, Any] | None:
    """``raw`` as a JSON object, or None. A job's log holds whatever its worker printed, so
    anything (deep nesting included) is just text."""
    if not raw.startswith("{"):
        return None
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _clock(ts: object) -> str:
    """``HH:MM:SS`` (local) of an epoch or ISO 8601 timestamp; empty if it is neither."""
    if isinstance(ts, str):
        try:
            ts = datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return ""
    if isinstance(ts, bool) or not isinstance(ts, (int, float)):
        return ""
    try:
        return time.strftime("%H:%M:%S", time.localtime(ts))
    except (OverflowError, OSError, ValueError):
        return ""


def log_json(raw: str) -> str:
    """One line of a job's log as JSON (a line the worker printed that is not JSON is wrapped)."""
    raw = raw.rstrip("\n")
    if _json_object(raw) is not None:
        return raw
    return json.dumps({"event": "output", "source": "worker", "line": raw})


#: Waiting jobs listed in the published snapshot (the rest are counted).
SNAPSHOT_WAITING = 200


def publish_snapshot(
    path: Path, ledger: Ledger, now: float, *, threshold_gib: float, stable_polls: int
) -> None:
    """Write what ``status`` and ``gpus`` show to ``path`` (atomically), readable by the group
    that owns the folder above it (the spool's submitters), so users who may not open the
    ledger still see the queue."""
    snap = gpus_snapshot(ledger)
    data = {
        "status": status_data(ledger, now, max_waiting=SNAPSHOT_WAITING, snap=snap),
        "gpus": gpus_data(snap, ledger.jobs([JobState.RUNNING]), threshold_gib, stable_polls),
    }
    folder = path.parent
    if not folder.is_dir():
        folder.mkdir(mode=0o750, parents=True, exist_ok=True)
        if os.geteuid() == 0:
            os.chown(folder, 0, folder.parent.stat().st_gid)
    tmp = folder / f".{path.name}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        os.write(fd, json.dumps(data).encode())
        if os.geteuid() == 0:
            os.fchown(fd, 0, folder.stat().st_gid)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_snapshot(path: Path) -> dict[str, Any] | None:
    """The last published snapshot, or None if there is none (or it cannot be read)."""
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data
