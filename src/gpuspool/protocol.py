"""The worker → daemon protocol and the names of a job's output files (torch-free).

A job process is run by a root daemon on behalf of a submitter, so everything it writes is
untrusted. Its events therefore travel on a channel of their own, never through the human log:
the daemon opens a per-job events file in its state folder and hands it to the worker as an
inherited file descriptor, announced in the environment as :data:`EVENTS_FD_ENV`. A file (not a
pipe) because a job outlives a daemon crash and the restarted daemon must still find its last
events.

The channel carries one JSON object per line, at most :data:`MAX_EVENT_BYTES` bytes. The daemon
reads it with :func:`parse_event`, which never raises: a line that is too long, not JSON, nested,
of an unknown kind, with a wrong type, an unbounded or non-finite number, is ignored (``None``).
What a valid event carries is bounded by the models below (numbers bounded and finite, strings
capped, unknown fields dropped), so nothing a worker writes can crash or stall the daemon, its
start-up or the CLI that shows the stored progress.

The output-file names (:func:`partial_path`, :func:`owner_path`) and the attempt's identity
handed to the worker on a shared ledger (:data:`FENCE_ENV`, :data:`HOST_ENV`) live here too, so
the daemon imports nothing from ``gpuspool.extract``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, TypeAdapter

from gpuspool.logs import iso_timestamp

#: Environment variable naming the file descriptor a worker writes its events to.
EVENTS_FD_ENV = "GPUSPOOL_EVENTS_FD"
#: On a shared ledger only: the fencing token of the job's attempt (``PgLedger.claim``), and
#: the host that claimed it. The worker keeps them in the owner file beside ``OUT.partial``
#: (:func:`owner_path`) and writes nothing once a newer attempt owns the output.
FENCE_ENV = "GPUSPOOL_FENCE"
HOST_ENV = "GPUSPOOL_HOST"
#: A worker started before its GPU is free (``prestart``) finds the read end of a pipe here: it
#: imports what it needs, then waits for one line from the daemon, :func:`encode_go`, which
#: names its GPU (and on a shared ledger its attempt). End of file: it is not wanted after all.
GATE_FD_ENV = "GPUSPOOL_GATE_FD"
#: What the go line may set in the worker's environment; nothing else is taken from it.
GO_KEYS = frozenset({"CUDA_VISIBLE_DEVICES", FENCE_ENV, HOST_ENV})
#: Longest go line (bytes): under ``PIPE_BUF``, so the daemon's one write to an empty pipe is
#: whole and never blocks.
MAX_GO_BYTES = 512
#: Longest event line (bytes, newline included) the daemon reads; longer lines are ignored.
MAX_EVENT_BYTES = 8192
#: Longest string value kept from an event (longer ones are cut by the writer, refused on read).
MAX_TEXT = 2048
#: Largest count or amount an event may carry.
MAX_NUMBER = 1e15

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")

Count = Annotated[StrictInt, Field(ge=0, le=int(MAX_NUMBER))]
Amount = Annotated[float, Field(ge=0.0, le=MAX_NUMBER, allow_inf_nan=False)]
Text = Annotated[str, Field(max_length=MAX_TEXT)]


class _Event(BaseModel):
    """Fields every event may carry. Strict: ``"5"`` is not a number, ``1`` is not a bool."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    def fields(self) -> dict[str, Any]:
        """The event's values without its kind, and without fields it did not carry."""
        return self.model_dump(exclude={"event"}, exclude_none=True)


class StartEvent(_Event):
    """The model is loaded and encoding begins."""

    event: Literal["start"]
    lines_total: Count | None = None
    lines_bad: Count | None = None
    audio_s_total: Amount | None = None
    longest_s: Amount | None = None
    device: Annotated[str, Field(max_length=64)] | None = None
    device_uuid: Annotated[str, Field(max_length=64)] | None = None
    batch_seconds: Amount | None = None
    need_gib: Amount | None = None
    resumed: StrictBool | None = None
    resume_line: Count | None = None
    lines_already_done: Count | None = None


class ProgressEvent(_Event):
    """Where the run is (every ``--progress-interval-s``)."""

    event: Literal["progress"]
    lines_done: Count | None = None
    lines_skipped: Count | None = None
    lines_total: Count | None = None
    audio_s_done: Amount | None = None
    audio_s_total: Amount | None = None
    audio_s_per_s: Amount | None = None
    eta_s: Amount | None = None
    gpu_peak_gib: Amount | None = None
    batches: Count | None = None


class SummaryEvent(_Event):
    """The run is complete (the output is in place)."""

    event: Literal["summary"]
    lines_done: Count | None = None
    lines_skipped: Count | None = None
    lines_total: Count | None = None
    audio_s_done: Amount | None = None
    audio_s_per_s: Amount | None = None
    wall_s: Amount | None = None
    #: Seconds from the worker's exec to its first batch sent to the device, and parts of it:
    #: importing the tokenizer's stack, loading the model, and waiting for the GPU.
    startup_s: Amount | None = None
    import_s: Amount | None = None
    model_load_s: Amount | None = None
    #: A worker started before its GPU was free: seconds from its exec to its go line, the part
    #: of ``startup_s`` before its GPU was given.
    gate_wait_s: Amount | None = None
    peak_gpu_gib: Amount | None = None
    need_gib: Amount | None = None
    batches: Count | None = None
    already_complete: StrictBool | None = None


class ErrorEvent(_Event):
    """The run stops with ``exit_code``; ``reason`` says why in words."""

    event: Literal["error"]
    exit_code: Annotated[StrictInt, Field(ge=0, le=255)]
    reason: Text = ""
    line: Count | None = None
    lines_done: Count | None = None
    lines_skipped: Count | None = None
    resume_line: Count | None = None


WorkerEvent = StartEvent | ProgressEvent | SummaryEvent | ErrorEvent
EVENT_KINDS = ("start", "progress", "summary", "error")

_ADAPTER: TypeAdapter[WorkerEvent] = TypeAdapter(
    Annotated[WorkerEvent, Field(discriminator="event")]
)


def parse_event(line: bytes | str) -> WorkerEvent | None:
    """One line of the events channel as an event, or None if it is not a valid one.

    Never raises, whatever the bytes: size is checked before parsing, pydantic's JSON parser
    bounds nesting, and the models bound every value.
    """
    if isinstance(line, str):
        line = line.encode("utf-8", "surrogateescape")
    if len(line) > MAX_EVENT_BYTES:
        return None
    line = line.strip()
    if not line.startswith(b"{"):
        return None
    try:
        event = _ADAPTER.validate_json(line)
    except Exception:  # ValidationError, and anything else the parser may raise
        return None
    if isinstance(event, ErrorEvent):
        event = event.model_copy(update={"reason": _CONTROL.sub("?", event.reason)})
    return event


def parse_events(chunk: bytes) -> list[WorkerEvent]:
    """Every valid event among the complete lines of ``chunk``."""
    out = []
    for line in chunk.split(b"\n"):
        event = parse_event(line)
        if event is not None:
            out.append(event)
    return out


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4) if math.isfinite(value) else None
    if isinstance(value, str) and len(value) > MAX_TEXT:
        return value[: MAX_TEXT - 1] + "…"
    return value


def encode_event(kind: str, fields: dict[str, Any], *, timestamp: str | None = None) -> bytes:
    """One event line: ``{"event": kind, "timestamp": ISO time, **fields}`` (the journal's
    format, :func:`gpuspool.logs.iso_timestamp`), non-finite floats as
    null and long strings cut, so it parses back (and fits :data:`MAX_EVENT_BYTES`)."""
    record: dict[str, Any] = {"event": kind, "timestamp": timestamp or iso_timestamp()}
    record.update({k: _clean(v) for k, v in fields.items()})
    line = json.dumps(record, ensure_ascii=False, default=str) + "\n"
    data = line.encode("utf-8", "replace")
    if len(data) > MAX_EVENT_BYTES:  # keep the kind and the fields the daemon reads
        keep = {k: v for k, v in record.items() if not isinstance(v, (str, list, dict))}
        keep["event"], keep["timestamp"] = kind, record["timestamp"]
        if "reason" in record:  # at most 4 bytes a character: fits with room to spare
            keep["reason"] = str(record["reason"])[: MAX_EVENT_BYTES // 8]
        data = (json.dumps(keep, ensure_ascii=False) + "\n").encode("utf-8", "replace")
    return data


def events_fd_from_env(environ: Mapping[str, str]) -> int | None:
    """The events descriptor announced in ``environ``, if it names an open descriptor."""
    return inherited_fd(environ, EVENTS_FD_ENV)


def inherited_fd(environ: Mapping[str, str], name: str) -> int | None:
    """The descriptor the variable ``name`` of ``environ`` announces, if it is open."""
    raw = environ.get(name)
    if raw is None or not raw.isdigit():
        return None
    fd = int(raw)
    try:
        os.fstat(fd)
    except OSError:
        return None
    return fd


def encode_go(env: Mapping[str, str]) -> bytes:
    """The daemon's go line for a waiting worker: the variables of :data:`GO_KEYS` to set."""
    unknown = set(env) - GO_KEYS
    if unknown:
        raise ValueError(f"not a go variable: {', '.join(sorted(unknown))}")
    data = (json.dumps(dict(env), sort_keys=True) + "\n").encode()
    if len(data) > MAX_GO_BYTES:
        raise ValueError(f"go line of {len(data)} bytes (at most {MAX_GO_BYTES})")
    return data


def parse_go(data: bytes) -> dict[str, str] | None:
    """The variables of a go line (:func:`encode_go`); None for anything else."""
    try:
        env = json.loads(data)
    except ValueError:
        return None
    if not isinstance(env, dict) or not set(env) <= GO_KEYS:
        return None
    if not all(isinstance(v, str) and not _CONTROL.search(v) for v in env.values()):
        return None
    return env


def partial_path(out: str | os.PathLike[str]) -> Path:
    """Where the finished prefix of ``out`` lives until the run completes (``OUT.partial``)."""
    return Path(str(out) + ".partial")


def owner_path(out: str | os.PathLike[str]) -> Path:
    """Which attempt owns ``out`` (``OUT.partial.owner``; see ``gpuspool.extract.owner``). Only
    the job's own workers, as its user, open it: never the daemon."""
    return Path(str(out) + ".partial.owner")
