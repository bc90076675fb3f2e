"""The data the daemon passes around: the job-file schema, job states, GPU snapshots.

No I/O here. ``JobSpec`` is the strict schema of a spool job file; ``GpuSnapshot`` is one poll of
one GPU; ``JobState`` the ledger's states.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)


class JobState(StrEnum):
    """A job's place in its lifecycle. Every change is one ledger transaction."""

    QUEUED = "queued"
    RUNNING = "running"
    #: Its process stopped without finishing (daemon stop or crash): resumes when placed again.
    INTERRUPTED = "interrupted"
    #: Waiting for a retry after a retryable failure (``not_before`` says when).
    DEFERRED = "deferred"
    HELD = "held"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES

    @property
    def runnable(self) -> bool:
        return self in RUNNABLE_STATES


TERMINAL_STATES = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})
RUNNABLE_STATES = frozenset({JobState.QUEUED, JobState.INTERRUPTED, JobState.DEFERRED})

#: NUL and the C0/C1 control characters (newline, tab, ESC, DEL, ...): never allowed in a string
#: that becomes a path, a command-line argument or a name shown in a terminal or a log line.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def refuse_control(value: str) -> str:
    """``value`` unchanged; ValueError naming the first control character if it has one."""
    found = _CONTROL.search(value)
    if found is not None:
        raise ValueError(
            f"must not contain control characters (found {found.group()!r} at {found.start()})"
        )
    return value


GpuRef = (
    Annotated[StrictStr, Field(min_length=1, max_length=128)] | Annotated[StrictInt, Field(ge=0)]
)

#: A host's name, as ``host_name`` in the configuration allows it.
HostName = Annotated[StrictStr, Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9._-]+$")]


class JobSpec(BaseModel):
    """A job file dropped into ``<spool_dir>/incoming/`` (TOML or JSON). Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, serialize_by_alias=True)

    input: Path = Field(description="Absolute path of the input JSONL (one object per line)")
    output: Path = Field(description="Absolute path of the output JSONL; must not exist yet")
    tokenizer: StrictStr = Field(min_length=1, max_length=4096, description="Folder or hub id")
    name: StrictStr | None = Field(None, min_length=1, max_length=200)
    priority: StrictInt = Field(0, ge=-1000, le=1000, description="Higher starts first")
    min_free_gib: float | Literal["auto"] | None = Field(
        None, description='GiB free needed to start; "auto" = computed need; default: config'
    )
    gpus: list[GpuRef] | None = Field(None, max_length=64, description="Allow-list: UUID/index")
    hosts: list[HostName] | None = Field(
        None, min_length=1, max_length=64, description="Allow-list of host names (shared ledger)"
    )
    batch_seconds: float | None = Field(None, gt=0, le=86400, description="Padded-s budget")
    on_bad_line: Literal["fail", "skip"] = "fail"
    dtype: Literal["fp32", "bf16"] = "fp32"
    timeout_s: float | None = Field(None, gt=0, description="Kill the job after this long")
    max_attempts: StrictInt | None = Field(None, ge=1, le=100)
    #: Discard a partial output an earlier job left at this output, at this job's first start
    #: (its own later starts resume as usual).
    restart: StrictBool = False

    #: Step aside (stop, wait again) when another user's process comes to the job's GPU, if the
    #: host's yield policy is on. ``yield = false`` in the job file opts out.
    yield_: StrictBool = Field(True, alias="yield")

    @field_validator("input", "output", mode="before")
    @classmethod
    def _path_from_str(cls, v: object) -> object:
        if isinstance(v, Path):
            v = str(v)
        if isinstance(v, str):
            if not v:
                raise ValueError("path must be a non-empty string")
            return refuse_control(v)
        raise ValueError("path must be a string")

    @field_validator("tokenizer", "name")
    @classmethod
    def _printable(cls, v: str | None) -> str | None:
        return v if v is None else refuse_control(v)

    @field_validator("gpus")
    @classmethod
    def _printable_refs(cls, v: list[str | int] | None) -> list[str | int] | None:
        for ref in v or ():
            if isinstance(ref, str):
                refuse_control(ref)
        return v

    @field_validator("input", "output")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        if not v.is_absolute():
            raise ValueError(f"path must be absolute, got {str(v)!r}")
        if ".." in v.parts:
            raise ValueError(f"path must not contain '..', got {str(v)!r}")
        if str(v).startswith("//"):  # kept by POSIX and pathlib, yet the same file as "/..."
            v = Path("/" + str(v).lstrip("/"))
        return v

    @field_validator("min_free_gib", mode="before")
    @classmethod
    def _threshold(cls, v: object) -> object:
        if isinstance(v, bool) or (isinstance(v, str) and v != "auto"):
            raise ValueError('min_free_gib must be a number or "auto"')
        if isinstance(v, int):
            v = float(v)
        if isinstance(v, float) and (not math.isfinite(v) or v < 0):
            raise ValueError('min_free_gib must be a finite number >= 0 or "auto"')
        return v

    @field_validator("batch_seconds", "timeout_s", mode="before")
    @classmethod
    def _int_to_float(cls, v: object) -> object:
        if isinstance(v, (bool, str)):
            raise ValueError("must be a number")
        if isinstance(v, int):
            return float(v)
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError("must be finite")
        return v

    @model_validator(mode="after")
    def _distinct_paths(self) -> JobSpec:
        if self.input == self.output:
            raise ValueError("input and output must differ")
        return self


@dataclass(frozen=True, slots=True)
class GpuProcess:
    """A compute process NVML shows on a GPU."""

    pid: int
    used_mib: float | None


@dataclass(frozen=True, slots=True)
class GpuSnapshot:
    """One GPU at one poll. ``healthy`` False means its state is unknown: never place on it."""

    index: int
    uuid: str
    name: str
    total_mib: float
    free_mib: float
    healthy: bool = True
    error: str | None = None
    processes: tuple[GpuProcess, ...] = field(default_factory=tuple)

    @property
    def free_gib(self) -> float:
        return self.free_mib / 1024.0

    @property
    def total_gib(self) -> float:
        return self.total_mib / 1024.0
