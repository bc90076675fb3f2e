"""Command line: the composition root. argv → settings → logging → adapters → exit code.

Every subcommand but ``daemon`` and ``extract`` is a short-lived client of the ledger (SQLite,
WAL) and the spool; none of them imports torch.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, RenderableType

from gpuspool.config import ConfigError, Settings, load_settings
from gpuspool.ledger import JobRecord, Ledger, LedgerError
from gpuspool.models import RUNNABLE_STATES, JobState
from gpuspool.views import (
    RECENT_FINISHED,
    gpus_data,
    gpus_snapshot,
    gpus_view,
    job_dict,
    log_json,
    log_line,
    read_snapshot,
    status_data,
    status_view,
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Wait for a GPU with enough free memory, then run spooled Qwen3-TTS extraction jobs.",
)
console = Console()
err = Console(stderr=True)

_state: dict[str, Any] = {"config": None}

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Config TOML (default /etc/gpuspool/gpuspool.toml)"),
]


@app.callback()
def _main(config: ConfigOpt = None) -> None:
    _state["config"] = config


def settings() -> Settings:
    try:
        return load_settings(_state["config"])
    except ConfigError as exc:
        err.print(f"[red]config error:[/red] {exc}")
        raise typer.Exit(2) from exc


def _ledger(s: Settings, *, readonly: bool = False) -> Ledger:
    """Open the daemon's ledger; commands that only read open it read-only, so they never
    take the write lock the daemon's tick needs."""
    if not s.ledger_path.exists():
        err.print(f"[red]no queue at {s.ledger_path}[/red] (has the daemon run with this config?)")
        raise typer.Exit(2)
    return Ledger(s.ledger_path, readonly=readonly)


def _ledger_if_allowed(s: Settings) -> Ledger | None:
    """The ledger, read-only, if this user may open it (root, or the daemon's own user)."""
    if os.access(s.ledger_path, os.R_OK | os.W_OK):
        try:
            return Ledger(s.ledger_path, readonly=True)
        except Exception:  # e.g. the WAL files belong to someone else
            pass
    return None


def _ledger_or_snapshot(s: Settings) -> Ledger | None:
    """The ledger if this user may open it; None means: show the daemon's published snapshot
    (submitters on a shared server may drop jobs but not open the daemon's database)."""
    ledger = _ledger_if_allowed(s)
    if ledger is not None:
        return ledger
    if read_snapshot(s.status_snapshot_path) is None:
        err.print(
            f"[red]cannot open the queue at {s.ledger_path}, and no status snapshot at"
            f" {s.status_snapshot_path}[/red] (is the daemon running, and are you in the"
            " submitters' group?)"
        )
        raise typer.Exit(2)
    return None


def _snapshot_part(s: Settings, part: str) -> dict[str, Any]:
    """A part of the published snapshot, with the calling user's own jobs in full."""
    snap = read_snapshot(s.status_snapshot_path, uid=os.getuid()) or {}
    data: dict[str, Any] = snap.get(part, {})
    return data


def _own_job(s: Settings, ref: str) -> dict[str, Any] | None:
    """One of the calling user's own jobs from their published snapshot (id, id prefix or
    name); None if there is none. Exits 1 if ``ref`` matches several."""
    snap = read_snapshot(s.status_snapshot_path, uid=os.getuid()) or {}
    jobs = [j for j in snap.get("own_jobs", []) if isinstance(j, dict)]
    exact = [j for j in jobs if j.get("id") == ref]
    found = exact or [
        j for j in jobs if str(j.get("id", "")).startswith(ref) or j.get("name") == ref
    ]
    if len(found) > 1:
        err.print(f"[red]{ref!r} matches {len(found)} of your jobs; give more of the id[/red]")
        raise typer.Exit(1)
    return found[0] if found else None


def _find_own(s: Settings, ref: str) -> dict[str, Any]:
    """A job of the calling user, for one who may not open the ledger; exits 1 if none."""
    job = _own_job(s, ref)
    if job is None:
        err.print(
            f"[red]none of your jobs matches {ref!r}[/red] (others' jobs are shown only"
            " anonymised; is the daemon running?)"
        )
        raise typer.Exit(1)
    return job


def _find(ledger: Ledger, ref: str) -> JobRecord:
    try:
        return ledger.find(ref)
    except LedgerError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc


# -- daemon ---------------------------------------------------------------------------------------


@app.command()
def daemon() -> None:
    """Run the daemon in the foreground (systemd runs this)."""
    s = settings()
    from gpuspool import logs

    logs.configure(s.log_format, s.log_level)
    from gpuspool import service

    raise typer.Exit(service.run(s, _state["config"]))


# -- submit ---------------------------------------------------------------------------------------


@app.command()
def submit(
    job_file: Annotated[Path | None, typer.Argument(help="A job file (TOML or JSON)")] = None,
    input: Annotated[Path | None, typer.Option("--input", "-i", help="Input JSONL")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output JSONL")] = None,
    tokenizer: Annotated[str | None, typer.Option(help="Tokenizer folder or hub id")] = None,
    name: Annotated[str | None, typer.Option(help="A name for the job")] = None,
    min_free_gib: Annotated[
        str | None, typer.Option(help='GiB free needed to start, or "auto"')
    ] = None,
    priority: Annotated[int | None, typer.Option(help="Higher starts first")] = None,
    gpus: Annotated[str | None, typer.Option(help="Allowed GPUs: UUIDs or indexes, a,b")] = None,
    batch_seconds: Annotated[float | None, typer.Option(help="Padded-seconds budget")] = None,
    on_bad_line: Annotated[str | None, typer.Option(help="fail or skip")] = None,
    dtype: Annotated[str | None, typer.Option(help="fp32 or bf16")] = None,
    timeout_s: Annotated[float | None, typer.Option(help="Stop the job after this long")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON")] = False,
) -> None:
    """Submit a job (from a job file, flags, or both: flags win) into the spool."""
    from gpuspool.estimate import job_need_gib, job_threshold_gib
    from gpuspool.spool import Spool, parse_job_bytes, validate_spec

    s = settings()
    data: dict[str, Any] = {}
    if job_file is not None:
        try:
            data = parse_job_bytes(job_file.read_bytes(), job_file.suffix.lower())
        except (OSError, ValueError) as exc:
            err.print(f"[red]{job_file}: {exc}[/red]")
            raise typer.Exit(1) from exc
    flags: dict[str, Any] = {
        "input": str(input.absolute()) if input else None,
        "output": str(output.absolute()) if output else None,
        "tokenizer": str(Path(tokenizer).absolute())
        if tokenizer and Path(tokenizer).exists()
        else tokenizer,
        "name": name,
        "priority": priority,
        "batch_seconds": batch_seconds,
        "on_bad_line": on_bad_line,
        "dtype": dtype,
        "timeout_s": timeout_s,
    }
    if min_free_gib is not None:
        flags["min_free_gib"] = "auto" if min_free_gib == "auto" else float(min_free_gib)
    if gpus is not None:
        flags["gpus"] = [int(g) if g.isdigit() else g for g in gpus.split(",") if g]
    data.update({k: v for k, v in flags.items() if v is not None})
    try:
        spec = validate_spec(data)
    except ValueError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    problems = []
    if not spec.input.is_file():
        problems.append(f"input: {spec.input} does not exist")
    if spec.output.exists():
        problems.append(f"output: {spec.output} already exists")
    elif not spec.output.parent.is_dir():
        problems.append(f"output: folder {spec.output.parent} does not exist")
    if problems:
        err.print("[red]" + "; ".join(problems) + "[/red]")
        raise typer.Exit(1)
    estimate = job_need_gib(spec, s.default_batch_seconds)
    if estimate.partial is not None:
        err.print(
            f"[yellow]could not read every audio header ({estimate.partial}); estimate is"
            " partial[/yellow]"
        )
    need, longest, budget = estimate.gib, estimate.longest_s, estimate.budget_s
    threshold = job_threshold_gib(spec, s.min_free_gib, need)
    try:
        path, job_id = Spool(s.spool_dir).submit(data, stem=spec.name or spec.input.stem)
    except OSError as exc:
        err.print(f"[red]cannot write into the spool {s.spool_dir}: {exc}[/red]")
        raise typer.Exit(1) from exc
    result = {
        "job_id": job_id,
        "file": str(path),
        "need_gib": need,
        "threshold_gib": threshold,
        "longest_clip_s": longest,
    }
    if as_json:
        print(json.dumps(result))
    else:
        console.print(
            f"submitted [bold]{job_id}[/bold]: needs ≈{need:.1f} GiB"
            f" (longest clip {longest:.1f} s, batch budget {budget:g} s);"
            f" starts when a GPU has {threshold:.1f} GiB free"
        )


# -- status and friends --------------------------------------------------------------------------


def _watch(render: Callable[[], RenderableType], interval_s: float) -> None:
    """Redraw ``render()`` in place every ``interval_s`` until Ctrl-C."""
    from rich.live import Live

    try:
        with Live(render(), console=console, auto_refresh=False, redirect_stderr=False) as live:
            while True:
                time.sleep(interval_s)
                live.update(render(), refresh=True)
    except KeyboardInterrupt:
        pass


IntervalOpt = Annotated[
    float, typer.Option("--interval", "-n", min=0.1, help="Seconds between redraws (--watch)")
]


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
    all_jobs: Annotated[
        bool, typer.Option("--all", help=f"Every finished job, not only the last {RECENT_FINISHED}")
    ] = False,
    all_waiting: Annotated[
        bool, typer.Option("--all-waiting", help="List every waiting job, not only the first 40")
    ] = False,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh in place")] = False,
    interval_s: IntervalOpt = 2.0,
) -> None:
    """Jobs, a progress bar each (lines, audio-s/s, ETA, GPU, peak); why waiting ones wait."""
    max_waiting = None if all_waiting else 40
    s = settings()
    ledger = _ledger_or_snapshot(s)

    def data(limit: int | None = max_waiting) -> dict[str, Any]:
        if ledger is None:
            return _snapshot_part(s, "status")
        return status_data(ledger, time.time(), all_jobs=all_jobs, max_waiting=limit)

    if as_json:
        print(json.dumps(data(None)))
    elif watch:
        _watch(
            lambda: status_view(data(), poll_interval_s=s.poll_interval_s, max_waiting=max_waiting),
            interval_s,
        )
    else:
        console.print(
            status_view(data(), poll_interval_s=s.poll_interval_s, max_waiting=max_waiting)
        )


@app.command()
def show(job: Annotated[str, typer.Argument(help="Job id (or a unique prefix, or name)")]) -> None:
    """Everything about one job, with its history (a submitter: one of their own jobs)."""
    s = settings()
    ledger = _ledger_if_allowed(s)
    if ledger is None:
        print(json.dumps(_find_own(s, job), indent=1, default=str))
        return
    record = _find(ledger, job)
    out = job_dict(record)
    out["spec"] = json.loads(record.spec.model_dump_json())
    out["progress"] = record.progress
    out["transitions"] = ledger.transitions(record.id)
    print(json.dumps(out, indent=1, default=str))


@app.command()
def gpus(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh in place")] = False,
    interval_s: IntervalOpt = 2.0,
) -> None:
    """Each GPU: free/total memory, fits the threshold?, stable polls, reservations, processes."""
    s = settings()
    ledger = _ledger_or_snapshot(s)

    def data() -> dict[str, Any]:
        if ledger is None:
            return _snapshot_part(s, "gpus")
        return gpus_data(
            gpus_snapshot(ledger),
            ledger.jobs([JobState.RUNNING]),
            s.min_free_gib,
            s.stable_polls,
        )

    if as_json:
        print(json.dumps(data(), indent=1))
    elif watch:
        _watch(lambda: gpus_view(data(), time.time()), interval_s)
    else:
        console.print(gpus_view(data(), time.time()))


def _change(job_ref: str, to: JobState, expect: set[JobState], detail: str, **fields: Any) -> None:
    s = settings()
    ledger = _ledger(s)
    record = _find(ledger, job_ref)
    try:
        ledger.transition(
            record.id,
            to,
            now=time.time(),
            expect=sorted(expect),
            detail=detail,
            reason=detail,
            **fields,
        )
    except LedgerError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    console.print(f"{record.id}: {to.value}")


@app.command()
def cancel(job: Annotated[str, typer.Argument(help="Job id")]) -> None:
    """Cancel a job; a running one is stopped (SIGTERM, then SIGKILL after the grace period)."""
    s = settings()
    ledger = _ledger(s)
    record = _find(ledger, job)
    try:
        new = ledger.request_cancel(record.id, now=time.time())
    except LedgerError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    msg = "stopping" if new.state == JobState.RUNNING else new.state.value
    console.print(f"{record.id}: {msg}")


@app.command()
def retry(job: Annotated[str, typer.Argument(help="Job id")]) -> None:
    """Queue a failed or cancelled job again (its partial output is resumed)."""
    _change(
        job,
        JobState.QUEUED,
        {JobState.FAILED, JobState.CANCELLED, JobState.DEFERRED},
        "retry requested",
        attempts=0,
        not_before=None,
        finished_at=None,
        cancel_requested=0,
    )


@app.command()
def hold(job: Annotated[str, typer.Argument(help="Job id")]) -> None:
    """Keep a waiting job from starting until released."""
    _change(job, JobState.HELD, set(RUNNABLE_STATES), "held by user")


@app.command()
def release(job: Annotated[str, typer.Argument(help="Job id")]) -> None:
    """Let a held job start again."""
    _change(job, JobState.QUEUED, {JobState.HELD}, "released by user")


@app.command()
def drain(
    wait: Annotated[
        bool, typer.Option("--wait", help="Return once no job is running any more")
    ] = False,
) -> None:
    """Stop starting new jobs; running ones finish. Survives restarts; ``resume`` undoes it."""
    ledger = _ledger(settings())
    ledger.set_draining(True)
    running = ledger.jobs([JobState.RUNNING])
    console.print(
        f"draining: no new jobs will start; {len(running)} running will finish"
        " (gpuspool resume to undo)"
    )
    while wait and running:
        time.sleep(1.0)
        running = ledger.jobs([JobState.RUNNING])
    if wait:
        console.print("drained: no job is running")


@app.command()
def resume() -> None:
    """Start jobs again after ``drain``."""
    ledger = _ledger(settings())
    was = ledger.draining()
    ledger.set_draining(False)
    counts = ledger.counts()
    waiting = sum(counts.get(st.value, 0) for st in RUNNABLE_STATES)
    prefix = "resumed" if was else "was not draining"
    console.print(f"{prefix}: {waiting} waiting job(s) start when GPUs have room")


@app.command(name="logs")
def job_logs(
    job: Annotated[str, typer.Argument(help="Job id")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing as it grows, until the job ends")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="JSON lines even on a terminal (the default otherwise)")
    ] = False,
) -> None:
    """The job's own log: worker output and the daemon's events for it (a submitter: the logs
    of their own jobs, which the daemon hands to them)."""
    s = settings()
    ledger = _ledger_if_allowed(s)
    if ledger is not None:
        record = _find(ledger, job)
        job_id, state, log_path = record.id, record.state.value, record.log_path
    else:
        own = _find_own(s, job)
        job_id, state, log_path = str(own["id"]), str(own["state"]), own.get("log_path")
    path = Path(log_path) if log_path else s.logs_dir / f"{job_id}.log"
    pretty = console.is_terminal and not as_json

    def emit(line: str) -> None:
        if pretty:
            console.print(log_line(line), soft_wrap=True, highlight=False)
        else:
            sys.stdout.write(log_json(line) + "\n")
            sys.stdout.flush()

    def ended() -> bool:
        if ledger is not None:
            now = ledger.get(job_id)
            return now is None or now.state.terminal
        mine = _own_job(s, job_id)
        return mine is None or JobState(mine["state"]).terminal

    while not path.exists():
        if not follow or ended():
            err.print(f"no log yet for {job_id} (state {state})")
            raise typer.Exit(0 if not follow else 1)
        time.sleep(0.5)
    try:
        log_file = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        err.print(f"[red]cannot read the log of {job_id}: {exc.strerror}[/red]")
        raise typer.Exit(1) from exc
    try:
        with log_file as f:
            pending = b""
            last_read = False
            while True:
                chunk = f.read(65536)
                if chunk:
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for raw in lines:
                        emit(raw.decode("utf-8", errors="replace"))
                    continue
                if not follow or last_read:
                    break
                # A job's last lines are written before its state changes: after seeing it end,
                # read once more, then stop.
                last_read = ended()
                if not last_read:
                    time.sleep(0.5)
            if pending:
                emit(pending.decode("utf-8", errors="replace"))
    except KeyboardInterrupt:
        pass


@app.command()
def plot(
    out: Annotated[Path, typer.Option("--output", "-o", help="PNG file to write")],
    hours: Annotated[float, typer.Option(min=0.01, help="How far back to draw")] = 24.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plotted data too")] = False,
) -> None:
    """Each GPU's free memory over time, the threshold, and when each job waited, ran and ended."""
    from dataclasses import asdict

    from gpuspool.plot import draw, plot_data

    s = settings()
    ledger = _ledger(s, readonly=True)
    now = time.time()
    data = plot_data(ledger, since=now - hours * 3600, until=now, threshold_gib=s.min_free_gib)
    try:
        draw(data, out, title=f"gpuspool: last {hours:g} h")
    except ImportError as exc:
        err.print(f"[red]plot needs matplotlib[/red] (pip install 'gpuspool[plot]'): {exc}")
        raise typer.Exit(1) from exc
    if as_json:
        print(json.dumps(asdict(data)))
    else:
        console.print(
            f"wrote {out}: {len(data.free_gib)} GPU(s), {len(data.jobs)} job(s),"
            f" threshold {data.threshold_gib:g} GiB"
        )


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def extract(ctx: typer.Context) -> None:
    """Run an extraction by hand (``gpuspool extract --help`` for its flags)."""
    from gpuspool.extract.cli import main as extract_main

    raise typer.Exit(extract_main(list(ctx.args)))


@app.command()
def doctor() -> None:
    """Check NVML, the driver, device permissions, folders, config and the extraction setup."""
    from gpuspool import doctor as doctor_mod

    raise typer.Exit(doctor_mod.main(settings()))


@app.command()
def demo(
    workdir: Annotated[
        Path | None, typer.Option(help="Where to put the demo's spool, state and data")
    ] = None,
) -> None:
    """A self-contained run: simulated GPUs, a tiny model, synthetic audio, the real daemon."""
    from gpuspool import demo as demo_mod

    raise typer.Exit(demo_mod.run(workdir))


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    import click

    try:
        rv = app(args=argv, standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        return 130
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
