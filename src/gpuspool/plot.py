"""``gpuspool plot``: each GPU's free memory over time, the threshold, and each job's life.

``plot_data`` turns the ledger's ``gpu_history`` (downsampled to at most ``max_points`` slices
per GPU, keeping each slice's lowest free memory so short dips stay visible) and ``transitions``
into plain data; ``draw`` renders it with matplotlib (imported only here, and only when drawing;
it comes with the ``plot`` extra).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpuspool.ledger_api import LedgerBackend
from gpuspool.models import RUNNABLE_STATES, JobState

_WAITING = {s.value for s in RUNNABLE_STATES} | {JobState.HELD.value}
#: A run's outcome by the state it ended in, where the two differ (only a yield sends a running
#: job back to ``queued``).
_RUN_OUTCOME = {JobState.DEFERRED.value: "retry", JobState.QUEUED.value: "yielded"}


@dataclass
class Segment:
    """A stretch of one job's life: ``kind`` is "wait" or "run"; ``end`` None = still going."""

    kind: str
    start: float
    end: float | None
    gpu_uuid: str | None = None
    outcome: str | None = None  # for runs: the state it ended in (done, failed, interrupted...)


@dataclass
class JobLane:
    job_id: str
    label: str
    threshold_gib: float
    segments: list[Segment] = field(default_factory=list)


@dataclass
class PlotData:
    since: float
    until: float
    #: Per GPU UUID: (time, lowest free GiB in the slice, or None where unreadable).
    free_gib: dict[str, list[tuple[float, float | None]]]
    total_gib: dict[str, float]
    threshold_gib: float
    jobs: list[JobLane]


def plot_data(
    ledger: LedgerBackend,
    *,
    since: float,
    until: float,
    threshold_gib: float,
    max_points: int = 600,
) -> PlotData:
    """What the plot shows, from the ledger alone (the daemon need not be running)."""
    bucket_s = max((until - since) / max_points, 1.0)
    free: dict[str, list[tuple[float, float | None]]] = {}
    total: dict[str, float] = {}
    for row in ledger.gpu_history_buckets(since, bucket_s):
        if row["at"] > until:
            continue
        value = row["min_free_mib"]
        free.setdefault(row["uuid"], []).append(
            (float(row["at"]), None if value is None else value / 1024.0)
        )
        if row["total_mib"] is not None:
            total[row["uuid"]] = max(total.get(row["uuid"], 0.0), row["total_mib"] / 1024.0)
    lanes: dict[str, JobLane] = {}
    open_seg: dict[str, Segment] = {}
    jobs = {j.id: j for j in ledger.jobs()}
    for t in ledger.transitions_since(since):
        if t["at"] > until:
            continue
        job_id, to, at = t["job_id"], t["to_state"], float(t["at"])
        job = jobs.get(job_id)
        if job_id not in lanes:
            lanes[job_id] = JobLane(
                job_id, job.label if job else job_id, job.threshold_gib if job else 0.0
            )
        current = open_seg.pop(job_id, None)
        if current is not None:
            current.end = at
            if current.kind == "run":
                current.outcome = _RUN_OUTCOME.get(to, to)
        if to in _WAITING:
            seg = Segment("wait", at, None)
        elif to == JobState.RUNNING.value:
            gpu = (t.get("detail") or "").removeprefix("starting on ").strip() or None
            seg = Segment("run", at, None, gpu_uuid=gpu or (job.gpu_uuid if job else None))
        else:
            continue
        lanes[job_id].segments.append(seg)
        open_seg[job_id] = seg
    for lane in lanes.values():  # clip to the window; drop what ended before it
        lane.segments = [s for s in lane.segments if s.end is None or s.end >= since]
        for s in lane.segments:
            s.start = max(s.start, since)
    return PlotData(
        since=since,
        until=until,
        free_gib=free,
        total_gib=total,
        threshold_gib=threshold_gib,
        jobs=[lane for lane in lanes.values() if lane.segments],
    )


#: The longest window ``plot`` draws by default, and the shortest.
MAX_DEFAULT_S = 24 * 3600.0
MIN_DEFAULT_S = 300.0


def data_since(ledger: LedgerBackend, until: float) -> float:
    """Where the default window starts: at the oldest GPU reading or transition of the last
    24 h (a little before it), so a daemon that ran for minutes fills the plot instead of
    sitting at the right edge of a 24 h axis; at least 5 minutes wide."""
    earliest = until - MAX_DEFAULT_S
    starts = [float(r["at"]) for r in ledger.gpu_history_buckets(earliest, 3600.0)]
    starts += [float(t["at"]) for t in ledger.transitions_since(earliest)[:1]]
    start = min((t for t in starts if t >= earliest), default=until - MIN_DEFAULT_S)
    span = max(until - start, MIN_DEFAULT_S) * 1.03
    return max(until - span, earliest)


#: How a run's end is marked: (marker, colour).
OUTCOME_MARK = {
    "done": ("o", "#2ca02c"),
    "failed": ("X", "#d62728"),
    "cancelled": ("s", "#7f7f7f"),
    "interrupted": ("^", "#ffbf00"),
    "retry": ("v", "#ffbf00"),
    "yielded": ("D", "#9467bd"),
}


def draw(data: PlotData, out: Path, *, title: str = "gpuspool") -> None:
    """Write a PNG: free memory per GPU above, one lane per job below (wait, run, outcome)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as _mdates
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    mdates: Any = _mdates  # partly untyped

    def when(t: float) -> Any:
        return mdates.date2num(_datetime(t))

    lanes = data.jobs
    height = 3.8 + 0.32 * max(len(lanes), 1)
    fig, (top, bottom) = plt.subplots(
        2,
        1,
        sharex=True,
        figsize=(12, min(height, 30)),
        gridspec_kw={"height_ratios": [3, max(1.2, 0.3 * len(lanes))]},
        constrained_layout=True,
    )
    colours = plt.get_cmap("tab10")
    gpu_colour: dict[str, Any] = {}
    for i, (uuid, points) in enumerate(sorted(data.free_gib.items())):
        gpu_colour[uuid] = colours(i % 10)
        xs = [when(t) for t, _ in points]
        ys = [float("nan") if v is None else v for _, v in points]
        top.step(xs, ys, where="post", color=gpu_colour[uuid], lw=1.6, label=f"{uuid[:16]} free")
        if uuid in data.total_gib:
            top.axhline(data.total_gib[uuid], color=gpu_colour[uuid], lw=0.6, ls=":", alpha=0.6)
    top.axhline(data.threshold_gib, color="black", ls="--", lw=1.2,
                label=f"threshold {data.threshold_gib:g} GiB")  # fmt: skip
    ceiling = y_ceiling(data)
    for lane in lanes:
        # A job's own threshold is drawn only where a GPU could reach it: one impossible job
        # must not squash every GPU's line to the bottom of a 500 GiB axis.
        if abs(lane.threshold_gib - data.threshold_gib) > 1e-6 and lane.threshold_gib <= ceiling:
            top.axhline(lane.threshold_gib, color="grey", ls="--", lw=0.6, alpha=0.5)
        for s in lane.segments:
            if s.kind == "run":
                top.axvline(when(s.start), color=gpu_colour.get(s.gpu_uuid or "", "grey"),
                            lw=0.8, alpha=0.5)  # fmt: skip
    top.set_ylabel("free memory (GiB)")
    top.set_ylim(0, ceiling * 1.05)
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize=8, ncols=2)
    top.set_title(title)

    used: set[str] = set()
    for row, lane in enumerate(lanes):
        y = len(lanes) - 1 - row
        for s in lane.segments:
            end = s.end if s.end is not None else data.until
            width = when(end) - when(s.start)
            if s.kind == "wait":
                bottom.broken_barh(
                    [(when(s.start), width)],
                    (y - 0.3, 0.6),
                    facecolors="#dddddd",
                    edgecolor="#999999",
                    hatch="//",
                )
            else:
                colour = gpu_colour.get(s.gpu_uuid or "", "#1f77b4")
                bottom.broken_barh([(when(s.start), width)], (y - 0.35, 0.7), facecolors=colour)
                used.add(s.gpu_uuid or "")
                if s.outcome:
                    marker, mcolour = OUTCOME_MARK.get(s.outcome, ("o", "black"))
                    bottom.plot(when(end), y, marker=marker, ms=8, color=mcolour, mec="black",
                                mew=0.6, ls="none")  # fmt: skip
    bottom.set_yticks(range(len(lanes)), [lane.label[:24] for lane in reversed(lanes)], fontsize=8)
    bottom.set_ylim(-0.8, max(len(lanes), 1) - 0.2)
    bottom.grid(axis="x", alpha=0.3)
    legend: list[Any] = [Patch(facecolor="#dddddd", edgecolor="#999999", hatch="//",
                               label="waiting")]  # fmt: skip
    legend += [Patch(color=c, label=f"running on {u[:16]}") for u, c in gpu_colour.items()
               if u in used]  # fmt: skip
    legend += [Line2D([], [], marker=m, color=c, mec="black", ls="none", label=k)
               for k, (m, c) in OUTCOME_MARK.items()]  # fmt: skip
    bottom.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, -0.35), fontsize=8,
                  ncols=min(len(legend), 8), frameon=False)  # fmt: skip
    locator = mdates.AutoDateLocator()
    bottom.xaxis.set_major_locator(locator)
    bottom.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    bottom.set_xlim(when(data.since), when(data.until))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def y_ceiling(data: PlotData) -> float:
    """The top of the memory axis: the largest GPU (or reading), and the default threshold
    when a GPU can reach it; never a job's threshold that no GPU has."""
    values = [*data.total_gib.values()]
    values += [v for points in data.free_gib.values() for _, v in points if v is not None]
    if not values:
        return max(data.threshold_gib, 1.0)
    largest = max(values)
    return max(largest, data.threshold_gib) if data.threshold_gib <= largest * 1.5 else largest


def _datetime(t: float) -> Any:
    from datetime import datetime

    return datetime.fromtimestamp(t)
