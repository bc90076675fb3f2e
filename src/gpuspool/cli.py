"""Command line: the composition root. argv → settings → logging → adapters → exit code.

Every subcommand but ``daemon`` and ``extract`` is a short-lived client of the ledger (SQLite,
WAL) and the spool; none of them imports torch.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, RenderableType
from rich.text import Text

from gpuspool.config import ConfigError, Settings, load_settings
from gpuspool.ledger import JobRecord, LedgerError
from gpuspool.ledger_api import LedgerBackend, open_ledger
from gpuspool.models import RUNNABLE_STATES, JobState
from gpuspool.views import (
    RECENT_FINISHED,
    LogLines,
    gpus_data,
    gpus_lines,
    gpus_snapshot,
    gpus_view,
    job_dict,
    log_json,
    log_line,
    read_snapshot,
    safe,
    status_data,
    status_lines,
    status_view,
)

app = typer.Typer(
    add_completion=True,
    no_args_is_help=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    help="Wait for a GPU with enough free memory, then run spooled Qwen3-TTS extraction jobs.",
)
console = Console()
err = Console(stderr=True)

_state: dict[str, Any] = {"config": None}

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Config TOML (default /etc/gpuspool/gpuspool.toml)"),
]


class UsageProblem(Exception):
    """A command line that cannot run: ``main`` prints one usage line and exits 2."""

    def __init__(self, message: str, usage: str = "gpuspool [OPTIONS] COMMAND [ARGS]...") -> None:
        super().__init__(message)
        self.usage = usage


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        from gpuspool import __version__

        try:
            number = version("gpuspool")
        except PackageNotFoundError:  # run from a source tree
            number = __version__
        print(f"gpuspool {number}")
        raise typer.Exit(0)


@app.callback(invoke_without_command=True)
def _main(
    ctx: typer.Context,
    config: ConfigOpt = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit"
        ),
    ] = False,
) -> None:
    _state["config"] = config
    if ctx.invoked_subcommand is None:
        names = ", ".join(sorted(c for c in _command_names()))
        raise UsageProblem(f"missing command (one of: {names})")


def _command_names() -> list[str]:
    return [c.name or (c.callback.__name__ if c.callback else "?") for c in app.registered_commands]


def _fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``message`` (escaped, never read as markup) in red on stderr; the Exit to raise."""
    err.print(Text(safe(message), "red"), soft_wrap=True)
    return typer.Exit(code)


def _emit(as_json: bool, data: dict[str, Any], text: str) -> None:
    """Print ``data`` as one JSON line with ``--json``, else ``text`` (escaped)."""
    if as_json:
        print(json.dumps(data))
    else:
        console.print(Text(safe(text)), soft_wrap=True, highlight=False)


def settings() -> Settings:
    try:
        return load_settings(_state["config"])
    except ConfigError as exc:
        raise _fail(f"config error: {exc}", 2) from exc


def _ledger(s: Settings, *, readonly: bool = False) -> LedgerBackend:
    """Open the daemon's ledger; commands that only read open it read-only, so they never
    take the write lock the daemon's tick needs."""
    if not s.ledger_is_shared and not s.ledger_path.exists():
        raise _fail(f"no queue at {s.ledger_path} (has the daemon run with this config?)", 2)
    try:
        return open_ledger(s, readonly=readonly)
    except (ConfigError, LedgerError) as exc:
        raise _fail(f"cannot open the ledger: {exc}", 2) from exc


def _ledger_if_allowed(s: Settings) -> LedgerBackend | None:
    """The ledger, read-only, if this user may open it (root, or the daemon's own user; anyone
    the database lets in, for a shared ledger: one it cannot reach is an error, exit 2)."""
    if s.ledger_is_shared:
        return _ledger(s, readonly=True)
    if os.access(s.ledger_path, os.R_OK | os.W_OK):
        try:
            return open_ledger(s, readonly=True)
        except Exception:  # e.g. the WAL files belong to someone else
            pass
    return None


def _ledger_or_snapshot(s: Settings) -> LedgerBackend | None:
    """The ledger if this user may open it; None means: show the daemon's published snapshot
    (submitters on a shared server may drop jobs but not open the daemon's database)."""
    ledger = _ledger_if_allowed(s)
    if ledger is not None:
        return ledger
    if read_snapshot(s.status_snapshot_path) is None:
        raise _fail(
            f"cannot open the queue at {s.ledger_shown}, and no status snapshot at"
            f" {s.status_snapshot_path} (is the daemon running, and are you in the"
            " submitters' group?)",
            2,
        )
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
        raise _fail(f"{ref!r} matches {len(found)} of your jobs; give more of the id")
    return found[0] if found else None


def _find_own(s: Settings, ref: str) -> dict[str, Any]:
    """A job of the calling user, for one who may not open the ledger; exits 1 if none."""
    job = _own_job(s, ref)
    if job is None:
        raise _fail(
            f"none of your jobs matches {ref!r} (others' jobs are shown only anonymised; is the"
            f" daemon running?){_refusal_note(s, ref)}"
        )
    return job


def _find(ledger: LedgerBackend, ref: str) -> JobRecord:
    try:
        return ledger.find(ref)
    except LedgerError as exc:
        refused = _refusal_note(settings(), ref)
        raise _fail(f"{exc}{refused}") from exc


def _refusal_note(s: Settings, ref: str) -> str:
    """'; the daemon refused it: REASON' when ``ref`` is a job the daemon rejected, else ''."""
    from gpuspool.spool import Spool

    try:
        found = Spool(s.spool_dir).find_rejected(ref)
    except OSError:
        return ""
    if found is None:
        return ""
    return f"; the daemon refused job {found.job_id}: {found.fields.get('reason', '?')}"


# -- daemon ---------------------------------------------------------------------------------------


@app.command()
def daemon() -> None:
    """Run the daemon in the foreground (systemd runs this)."""
    from gpuspool import logs

    try:
        s = load_settings(_state["config"])
    except ConfigError as exc:  # one log line (JSON under systemd), never wrapped text
        logs.configure(logs.startup_format(), "info")
        logs.get().error("config_invalid", config=str(exc.path), field=exc.field, error=exc.problem)
        raise typer.Exit(2) from exc
    logs.configure(s.log_format, s.log_level)
    from gpuspool import service

    try:
        code = service.run(s, _state["config"])
    except Exception as exc:  # e.g. an unwritable state folder: one log line, not a traceback
        logs.get().exception("daemon_failed", error=str(exc))
        raise typer.Exit(1) from exc
    raise typer.Exit(code)


# -- submit ---------------------------------------------------------------------------------------

#: What a Hugging Face hub id looks like: ``org/name``.
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def resolve_tokenizer(value: str, base: Path) -> str:
    """An existing tokenizer path as an absolute path, a hub id (``org/name``) as it is.

    A relative name that is neither an existing path (under ``base``) nor shaped like a hub id
    is a mistake (``--tokenizer toq``): the worker would try it on the hub, fail, and retry.
    """
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = base / path
    if path.exists():
        return str(path.absolute())
    if Path(value).is_absolute() or value.startswith(("./", "../", "~")):
        raise ValueError(f"tokenizer: {value} does not exist")
    if HUB_ID.fullmatch(value) and ".." not in value:
        return value
    raise ValueError(
        f"tokenizer: {value!r} is neither an existing folder nor a hub id like"
        " Qwen/Qwen3-TTS-Tokenizer-12Hz"
    )


def _min_free(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not number >= 0 or number == float("inf"):
        raise UsageProblem(
            f'--min-free-gib: {value!r} is not a number of GiB (or "auto")',
            "gpuspool submit [OPTIONS] [JOB_FILE]",
        )
    return number


def _path_problems(input_path: Path, output: Path) -> list[str]:
    """What the submitter can check before the daemon does: input readable, output free."""
    problems = []
    if not input_path.is_file():
        problems.append(f"input: {input_path} does not exist (or is not a file)")
    elif not os.access(input_path, os.R_OK):
        problems.append(f"input: {input_path} is not readable by you")
    if output.exists() or output.is_symlink():
        problems.append(f"output: {output} already exists")
    elif not output.parent.is_dir():
        problems.append(f"output: folder {output.parent} does not exist")
    elif not os.access(output.parent, os.W_OK | os.X_OK):
        problems.append(f"output: folder {output.parent} is not writable by you")
    return problems


def _largest_gpu_gib(s: Settings) -> float | None:
    """The largest GPU the daemon last saw (ledger or published snapshot), if known."""
    snap: dict[str, Any] | None = None
    try:
        if s.ledger_is_shared or os.access(s.ledger_path, os.R_OK):
            snap = gpus_snapshot(open_ledger(s, readonly=True))
    except Exception:  # an unreadable ledger only costs the warning
        snap = None
    if not snap or not snap.get("gpus"):
        snap = _snapshot_part(s, "gpus")
    totals = [g.get("total_mib") for g in snap.get("gpus", []) if isinstance(g, dict)]
    sizes = [t / 1024.0 for t in totals if isinstance(t, (int, float))]
    return max(sizes) if sizes else None


def _read_job_file(job_file: Path) -> dict[str, Any]:
    from gpuspool.spool import parse_job_bytes

    suffix = job_file.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise _fail(f"{job_file}: job files must end in .toml or .json")
    try:
        return parse_job_bytes(job_file.read_bytes(), suffix)
    except (OSError, ValueError) as exc:
        raise _fail(f"{job_file}: {exc}") from exc


@app.command()
def submit(
    job_file: Annotated[Path | None, typer.Argument(help="A job file (TOML or JSON)")] = None,
    input: Annotated[Path | None, typer.Option("--input", "-i", help="Input JSONL")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output JSONL")] = None,
    tokenizer: Annotated[
        str | None, typer.Option(help="Tokenizer folder, or hub id (org/name)")
    ] = None,
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
    restart: Annotated[
        bool, typer.Option("--restart", help="Discard a partial output an earlier job left")
    ] = False,
    no_yield: Annotated[
        bool,
        typer.Option(
            "--no-yield", help="Keep running when another user's process comes to the GPU"
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON")] = False,
) -> None:
    """Submit a job (from a job file, flags, or both: flags win) into the spool.

    Checks what it can as you before it publishes the job: the input is readable, the output
    does not exist and its folder is writable, the tokenizer exists (or is a hub id). The daemon
    checks again; if it refuses the job, ``gpuspool show ID`` shows why.
    """
    from gpuspool.estimate import job_need_gib, job_threshold_gib
    from gpuspool.spool import Spool, validate_spec

    threshold_flag = _min_free(min_free_gib) if min_free_gib is not None else None
    s = settings()
    data: dict[str, Any] = _read_job_file(job_file) if job_file is not None else {}
    flags: dict[str, Any] = {
        "input": str(input.absolute()) if input else None,
        "output": str(output.absolute()) if output else None,
        "tokenizer": tokenizer,
        "name": name,
        "min_free_gib": threshold_flag,
        "priority": priority,
        "batch_seconds": batch_seconds,
        "on_bad_line": on_bad_line,
        "dtype": dtype,
        "timeout_s": timeout_s,
        "restart": True if restart else None,
        "yield": False if no_yield else None,
    }
    if gpus is not None:
        flags["gpus"] = [int(g) if g.isdigit() else g for g in gpus.split(",") if g]
    data.update({k: v for k, v in flags.items() if v is not None})
    if isinstance(data.get("tokenizer"), str):
        base = Path.cwd() if tokenizer is not None or job_file is None else job_file.parent
        try:
            data["tokenizer"] = resolve_tokenizer(data["tokenizer"], base.absolute())
        except ValueError as exc:
            raise _fail(str(exc)) from exc
    try:
        spec = validate_spec(data)
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    problems = _path_problems(spec.input, spec.output)
    if problems:
        raise _fail("; ".join(problems))
    estimate = job_need_gib(spec, s.default_batch_seconds)
    warnings = []
    if estimate.partial is not None:
        warnings.append(f"could not read every audio header ({estimate.partial}); estimate is"
                        " partial")  # fmt: skip
    need, longest, budget = estimate.gib, estimate.longest_s, estimate.budget_s
    threshold = job_threshold_gib(spec, s.min_free_gib, need)
    if threshold < need:
        warnings.append(
            f"threshold {threshold:.1f} GiB is below the computed need {need:.1f} GiB: the job"
            " may start on a GPU without room for it and fail out of memory"
        )
    partial = spec.output.with_name(spec.output.name + ".partial")  # the worker's OUT.partial
    if partial.exists() and not spec.restart:
        warnings.append(
            f"{partial} is left from an earlier run: the job resumes from it if it was written"
            " with the same arguments, and fails otherwise (submit --restart to start over)"
        )
    largest = _largest_gpu_gib(s)
    if largest is not None and max(need, threshold) > largest:
        warnings.append(
            f"{max(need, threshold):.1f} GiB is more than the largest GPU here has"
            f" ({largest:.1f} GiB): the job waits until one fits"
            + (" (lower --batch-seconds)" if need > largest else " (lower --min-free-gib)")
        )
    for warning in warnings:
        err.print(Text(f"warning: {safe(warning)}", "yellow"), soft_wrap=True)
    try:
        path, job_id = Spool(s.spool_dir).submit(data, stem=spec.name or spec.input.stem)
    except OSError as exc:
        raise _fail(f"cannot write into the spool {s.spool_dir}: {exc}") from exc
    result = {
        "job_id": job_id,
        "file": str(path),
        "need_gib": need,
        "threshold_gib": threshold,
        "longest_clip_s": longest,
        "warnings": warnings,
    }
    _emit(
        as_json,
        result,
        f"submitted {job_id}: needs ≈{need:.1f} GiB (longest clip {longest:.1f} s, batch budget"
        f" {budget:g} s); starts when a GPU has {threshold:.1f} GiB free",
    )


# -- status and friends --------------------------------------------------------------------------


def _watch(
    render: Callable[[], RenderableType], lines: Callable[[], list[str]], interval_s: float
) -> None:
    """Redraw ``render()`` in place every ``interval_s`` until Ctrl-C; through a pipe, print
    ``lines()`` as a new block each interval instead (a blank line between blocks)."""
    try:
        if not console.is_terminal:
            first = True
            while True:
                if not first:
                    sys.stdout.write("\n")
                first = False
                sys.stdout.write("".join(f"{line}\n" for line in lines()))
                sys.stdout.flush()
                time.sleep(interval_s)
        from rich.live import Live

        with Live(render(), console=console, auto_refresh=False, redirect_stderr=False) as live:
            while True:
                time.sleep(interval_s)
                live.update(render(), refresh=True)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `status --watch | head`
        sys.stderr.close()


def _print_lines(lines: list[str]) -> None:
    sys.stdout.write("".join(f"{line}\n" for line in lines))


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
    """Jobs, a progress bar each (lines, audio-s/s, ETA, GPU, peak); why waiting ones wait.

    On a terminal: a table that fits its width (columns are left out, never ids or states).
    Through a pipe: every job on its own tab-separated line (id, state, GPU, lines, rate, ETA,
    peak, name, reason), so `grep` and `awk` work.
    """
    piped = not console.is_terminal
    max_waiting = None if all_waiting or piped else 40
    s = settings()
    ledger = _ledger_or_snapshot(s)

    def data(limit: int | None = max_waiting) -> dict[str, Any]:
        if ledger is None:
            return _snapshot_part(s, "status")
        return status_data(
            ledger,
            time.time(),
            all_jobs=all_jobs,
            max_waiting=limit,
            fair_share_half_life_s=None if piped and not as_json else s.fair_share_half_life_s,
        )

    def render() -> RenderableType:
        return status_view(
            data(), poll_interval_s=s.poll_interval_s, max_waiting=max_waiting, width=console.width
        )

    def lines() -> list[str]:
        return status_lines(data(), poll_interval_s=s.poll_interval_s)

    if as_json:
        print(json.dumps(data(None)))
    elif watch:
        _watch(render, lines, interval_s)
    elif piped:
        _print_lines(lines())
    else:
        console.print(render())


def _local_time(value: object) -> object:
    """An epoch time as a local ISO 8601 time with its offset; anything else as it is."""
    from datetime import datetime

    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value).astimezone().isoformat(timespec="seconds")
        except (OverflowError, OSError, ValueError):
            return value
    return value


TIME_KEYS = ("at", "ts", "submitted_at", "started_at", "finished_at", "not_before", "updated_at",
             "rejected_at")  # fmt: skip


def _with_local_times(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: _local_time(v) if k in TIME_KEYS else _with_local_times(v) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_with_local_times(v) for v in value]
    return value


def _show_rejected(s: Settings, ref: str) -> dict[str, Any] | None:
    """A job the daemon refused, from its ``.reason`` file in ``rejected/``."""
    from gpuspool.spool import Spool

    try:
        found = Spool(s.spool_dir).find_rejected(ref)
    except PermissionError as exc:
        raise _fail(f"cannot read the rejected jobs in {s.spool_dir}: {exc.strerror}") from exc
    if found is None:
        return None
    return {"id": found.job_id, "state": "rejected", **found.fields, "reason_file": str(found.path),
            "rejected_at": found.at}  # fmt: skip


def _show_queued(s: Settings, ref: str) -> dict[str, Any] | tuple[str, int]:
    """The job from the ledger, in full; else why not and the exit code: 1 for no such job,
    2 for a queue that cannot be opened or read."""
    if not s.ledger_is_shared and not s.ledger_path.exists():
        return f"no job matches {ref!r} (and no queue at {s.ledger_path})", 1
    try:
        ledger = open_ledger(s, readonly=True)
    except Exception as exc:  # e.g. the ledger is not this user's to open
        return f"cannot open the ledger: {exc}", 2
    try:
        record = ledger.find(ref)
        out = job_dict(record)
        out["spec"] = json.loads(
            record.spec_json
        )  # as stored: a row a newer check refuses shows too
        out["progress"] = record.progress
        out["transitions"] = ledger.transitions(record.id)
    except LedgerError as exc:
        return str(exc), 1
    except Exception as exc:  # e.g. the ledger is not this user's to open
        return f"cannot read the queue at {s.ledger_shown}: {exc}", 2
    finally:
        ledger.close()
    return out


@app.command()
def show(
    job: Annotated[str, typer.Argument(help="Job id (or a unique prefix, or name)")],
    epoch: Annotated[
        bool, typer.Option("--epoch", help="Times as seconds since the epoch (as stored)")
    ] = False,
) -> None:
    """Everything about one job, with its history, as JSON (times in local ISO 8601); a
    submitter who may not open the ledger sees their own jobs only.

    A job the daemon refused (bad file, output taken, ...) is found by the id ``submit``
    printed, with the reason.
    """
    s = settings()
    ledger = _ledger_if_allowed(s)
    found: dict[str, Any] | tuple[str, int] | None
    if ledger is not None:
        ledger.close()
        found = _show_queued(s, job)
    else:
        found = _own_job(s, job) or (
            f"none of your jobs matches {job!r} (others' jobs are shown only anonymised; is"
            " the daemon running?)",
            1,
        )
    out = found if isinstance(found, dict) else _show_rejected(s, job)
    if out is None:
        message, code = found if isinstance(found, tuple) else (f"no job matches {job!r}", 1)
        raise _fail(message, code)
    print(json.dumps(out if epoch else _with_local_times(out), indent=1, default=str))


@app.command()
def gpus(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh in place")] = False,
    interval_s: IntervalOpt = 2.0,
) -> None:
    """Each GPU: free/total memory, fits the threshold?, stable polls, reservations, processes.

    Through a pipe: one GPU per tab-separated line (index, uuid, free, total, reserved, fits,
    stable, name, processes).
    """
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
            host_timeout_s=s.host_timeout_s,
        )

    def render() -> RenderableType:
        return gpus_view(data(), time.time(), width=console.width)

    def lines() -> list[str]:
        return gpus_lines(data(), time.time())

    if as_json:
        print(json.dumps(data(), indent=1))
    elif watch:
        _watch(render, lines, interval_s)
    elif not console.is_terminal:
        _print_lines(lines())
    else:
        console.print(render())


JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON")]


def _change(
    job_ref: str,
    to: JobState,
    expect: set[JobState],
    detail: str,
    as_json: bool,
    **fields: Any,
) -> None:
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
        raise _fail(str(exc)) from exc
    _emit(as_json, {"job_id": record.id, "state": to.value}, f"{record.id}: {to.value}")


@app.command()
def cancel(job: Annotated[str, typer.Argument(help="Job id")], as_json: JsonOpt = False) -> None:
    """Cancel a job; a running one is stopped (SIGTERM, then SIGKILL after the grace period)."""
    s = settings()
    ledger = _ledger(s)
    record = _find(ledger, job)
    try:
        new = ledger.request_cancel(record.id, now=time.time())
    except LedgerError as exc:
        raise _fail(str(exc)) from exc
    stopping = new.state == JobState.RUNNING
    msg = "stopping" if stopping else new.state.value
    _emit(
        as_json,
        {"job_id": record.id, "state": new.state.value, "stopping": stopping},
        f"{record.id}: {msg}",
    )


@app.command()
def retry(job: Annotated[str, typer.Argument(help="Job id")], as_json: JsonOpt = False) -> None:
    """Queue a failed or cancelled job again (its partial output is resumed)."""
    _change(
        job,
        JobState.QUEUED,
        {JobState.FAILED, JobState.CANCELLED, JobState.DEFERRED},
        "retry requested",
        as_json,
        attempts=0,
        not_before=None,
        finished_at=None,
        cancel_requested=0,
    )


@app.command()
def hold(job: Annotated[str, typer.Argument(help="Job id")], as_json: JsonOpt = False) -> None:
    """Keep a waiting job from starting until released."""
    _change(job, JobState.HELD, set(RUNNABLE_STATES), "held by user", as_json)


@app.command()
def release(job: Annotated[str, typer.Argument(help="Job id")], as_json: JsonOpt = False) -> None:
    """Let a held job start again."""
    _change(job, JobState.QUEUED, {JobState.HELD}, "released by user", as_json)


@app.command()
def drain(
    wait: Annotated[
        bool, typer.Option("--wait", help="Return once no job is running any more")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Stop starting new jobs; running ones finish. Survives restarts; ``resume`` undoes it."""
    ledger = _ledger(settings())
    ledger.set_draining(True)
    running = ledger.jobs([JobState.RUNNING])
    if not as_json:
        console.print(
            f"draining: no new jobs will start; {len(running)} running will finish"
            " (gpuspool resume to undo)"
        )
    while wait and running:
        time.sleep(1.0)
        running = ledger.jobs([JobState.RUNNING])
    if as_json:
        print(json.dumps({"draining": True, "running": len(running)}))
    elif wait:
        console.print("drained: no job is running")


@app.command()
def resume(as_json: JsonOpt = False) -> None:
    """Start jobs again after ``drain``."""
    ledger = _ledger(settings())
    was = ledger.draining()
    ledger.set_draining(False)
    counts = ledger.counts()
    waiting = sum(counts.get(st.value, 0) for st in RUNNABLE_STATES)
    prefix = "resumed" if was else "was not draining"
    _emit(
        as_json,
        {"draining": False, "was_draining": was, "waiting": waiting},
        f"{prefix}: {waiting} waiting job(s) start when GPUs have room",
    )


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
        ran_on = record.host
    else:
        own = _find_own(s, job)
        job_id, state, log_path = str(own["id"]), str(own["state"]), own.get("log_path")
        ran_on = own.get("host")
    path = Path(log_path) if log_path else s.logs_dir / f"{job_id}.log"
    if ran_on and ran_on != s.host_name and not path.exists():
        # A shared ledger: the log is in the state_dir of the host that ran the job's last
        # attempt, which this host cannot read; "no log yet" would say it was never written.
        err.print(
            Text(safe(f"the log of {job_id} (state {state}) is on host {ran_on}, at {path}:"
                      f" run `gpuspool logs` there (this is host {s.host_name})"))
        )  # fmt: skip
        raise typer.Exit(1)
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
            err.print(Text(safe(f"no log yet for {job_id} (state {state})")))
            raise typer.Exit(0 if not follow else 1)
        time.sleep(0.5)
    try:
        log_file = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        err.print(f"[red]cannot read the log of {job_id}: {exc.strerror}[/red]")
        raise typer.Exit(1) from exc
    try:
        with log_file as f:
            lines = LogLines()  # the log is its submitter's: any line length, bounded here
            last_read = False
            while True:
                chunk = f.read(1 << 20)
                if chunk:
                    for line in lines.feed(chunk):
                        emit(line)
                    continue
                if not follow or last_read:
                    break
                # A job's last lines are written before its state changes: after seeing it end,
                # read once more, then stop.
                last_read = ended()
                if not last_read:
                    time.sleep(0.5)
            for line in lines.rest():
                emit(line)
    except KeyboardInterrupt:
        pass


@app.command()
def plot(
    out: Annotated[Path, typer.Option("--output", "-o", help="PNG file to write")],
    hours: Annotated[
        float | None,
        typer.Option(min=0.01, help="How far back to draw (default: the data, at most 24 h)"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plotted data too")] = False,
) -> None:
    """Each GPU's free memory over time, the threshold, and when each job waited, ran and ended."""
    from dataclasses import asdict

    from gpuspool.plot import data_since, draw, plot_data

    s = settings()
    ledger = _ledger(s, readonly=True)
    now = time.time()
    since = now - hours * 3600 if hours is not None else data_since(ledger, now)
    data = plot_data(ledger, since=since, until=now, threshold_gib=s.min_free_gib)
    span = (now - since) / 3600
    window = f"last {span:g} h" if hours is not None else f"last {_span_text(now - since)}"
    try:
        draw(data, out, title=f"gpuspool: {window}")
    except ImportError as exc:
        raise _fail(f"plot needs matplotlib (pip install 'gpuspool[plot]'): {exc}") from exc
    if as_json:
        print(json.dumps(asdict(data)))
    else:
        _emit(
            False,
            {},
            f"wrote {out}: {len(data.free_gib)} GPU(s), {len(data.jobs)} job(s),"
            f" threshold {data.threshold_gib:g} GiB, {window}",
        )


def _span_text(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def extract(ctx: typer.Context) -> None:
    """Run an extraction by hand (``gpuspool extract --help`` for its flags)."""
    from gpuspool.extract.cli import build_parser

    args = list(ctx.args)
    if "-h" in args or "--help" in args:  # needs no torch: a daemon-only install shows it too
        build_parser().print_help()
        raise typer.Exit(0)
    try:
        import gpuspool.extract.worker  # noqa: F401  (soxr, torch, qwen-tts: the extract extra)
    except ImportError as exc:
        raise _fail(
            f"gpuspool extract needs the extraction extra (pip install 'gpuspool[extract]'): {exc}"
        ) from exc
    from gpuspool.extract.cli import main as extract_main

    raise typer.Exit(extract_main(args))


@app.command()
def doctor() -> None:
    """Check NVML, the driver, device permissions, folders, config and the extraction setup."""
    from gpuspool import doctor as doctor_mod
    from gpuspool.config import DEFAULT_CONFIG_PATH

    path = _state["config"]
    if path is None and DEFAULT_CONFIG_PATH.exists():
        path = DEFAULT_CONFIG_PATH
    raise typer.Exit(doctor_mod.main(settings(), config_path=path))


@app.command()
def demo(
    workdir: Annotated[
        Path | None,
        typer.Option(help="Where to put the demo's spool, state and data (kept afterwards)"),
    ] = None,
) -> None:
    """A self-contained run: simulated GPUs, a tiny model, synthetic audio, the real daemon."""
    from gpuspool import demo as demo_mod

    raise typer.Exit(demo_mod.run(workdir))


# -- entry point ----------------------------------------------------------------------------------


def _usage_line(exc: BaseException) -> str:
    """One line for a usage mistake: what is wrong, the usage, where help is."""
    if isinstance(exc, UsageProblem):
        usage, message = exc.usage, str(exc)
        command = usage.split(" [", 1)[0]
    else:
        ctx = getattr(exc, "ctx", None)
        usage = ctx.get_usage().strip() if ctx is not None else "gpuspool [OPTIONS] COMMAND"
        usage = " ".join(usage.removeprefix("Usage:").split())
        command = ctx.command_path if ctx is not None else "gpuspool"
        format_message = getattr(exc, "format_message", None)
        message = format_message() if callable(format_message) else str(exc)
    message = " ".join(safe(message).split())
    return f"error: {message} (usage: {safe(usage)}; {command} -h for help)"


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code.

    Usage mistakes print one line on stderr and return 2; no traceback. Typer's own parser
    errors are ``typer.TyperException``s (typer >= 0.27 vendors click; ``UsageError`` has exit
    code 2), so nothing here imports click.
    """
    try:
        rv = app(args=argv, prog_name="gpuspool", standalone_mode=False)
    except UsageProblem as exc:
        sys.stderr.write(_usage_line(exc) + "\n")
        return 2
    except typer.TyperException as exc:
        code = int(getattr(exc, "exit_code", 1))
        if code == 2:
            sys.stderr.write(_usage_line(exc) + "\n")
        else:
            sys.stderr.write(f"error: {' '.join(safe(exc.format_message()).split())}\n")
        return code
    except typer.Abort:
        sys.stderr.write("aborted\n")
        return 130
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `gpuspool status | head -1`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
