"""Settings: a TOML file plus ``GPUSPOOL_*`` environment variables (pydantic-settings).

Precedence, highest first: keyword arguments (the CLI), environment variables, the TOML file,
defaults. ``config/gpuspool.toml`` documents every key. Must not import anything of the daemon.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_CONFIG_PATH = Path("/etc/gpuspool/gpuspool.toml")
SQLITE_PREFIX = "sqlite://"
POSTGRES_PREFIXES = ("postgresql://", "postgres://")
_HOST_NAME = re.compile(r"[A-Za-z0-9._-]{1,253}")


class Settings(BaseSettings):
    """Every setting of the daemon and the CLI, with its default."""

    model_config = SettingsConfigDict(env_prefix="GPUSPOOL_", extra="forbid", frozen=True)

    #: The TOML file read by ``load_settings`` (set per load, not a setting itself).
    _toml_path: ClassVar[Path | None] = None

    spool_dir: Path = Field(Path("/var/spool/gpuspool"), description="Spool root: incoming/, ...")
    state_dir: Path = Field(Path("/var/lib/gpuspool"), description="Ledger and per-job logs")
    ledger_url: str | None = Field(
        None,
        description='Where the ledger lives: None is "sqlite:///<state_dir>/ledger.sqlite3"; a'
        ' "postgresql://user@host/db" URL shares one ledger between hosts',
    )
    host_name: str = Field(
        default_factory=socket.gethostname, description="This host's name in a shared ledger"
    )
    poll_interval_s: float = Field(5.0, gt=0, description="Seconds between NVML polls (ticks)")
    host_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Shared ledger: a host silent this long loses its running jobs to the queue",
    )
    stable_polls: int = Field(3, ge=1, description="Consecutive polls a GPU must fit a job")
    min_free_gib: float = Field(100.0, ge=0, description="Default free-memory threshold (GiB)")
    gpu_source: str = Field("nvml", description='"nvml" or "file:/path/gpus.json"')
    max_attempts: int = Field(3, ge=1, description="Starts before a retryable failure is final")
    retry_backoff_s: float = Field(60.0, ge=0, description="First retry delay; doubles each time")
    stop_grace_s: float = Field(30.0, ge=0, description="SIGTERM to SIGKILL grace for a job")
    max_job_file_bytes: int = Field(65536, gt=0, description="Larger job files are rejected")
    rejected_keep_days: float = Field(
        7.0, gt=0, description="Days a refused entry and its .reason stay in rejected/"
    )
    progress_log_interval_s: float = Field(30.0, ge=0, description="Min gap of job_progress logs")
    intake_max_files: int = Field(200, ge=1, description="Job files intake takes per tick")
    intake_max_ms: float = Field(250.0, gt=0, description="Time intake may spend per tick (ms)")
    intake_retry_s: float = Field(30.0, ge=0, description="Retry delay after a daemon-side error")
    requeue_check_s: float = Field(
        300.0, gt=0, description="How often accepted/ is checked for jobs the ledger lacks"
    )
    scan_concurrency: int = Field(4, ge=1, le=64, description="Scanner processes at once")
    scan_batch: int = Field(128, ge=1, le=256, description="Jobs of one user per scanner")
    scan_timeout_s: float = Field(60.0, gt=0, le=3600, description="Wall-clock limit of a scan")
    scan_max_lines: int = Field(200_000, ge=1, description="Input lines a scan reads at most")
    scan_max_bytes: int = Field(256 << 20, ge=1, description="Input bytes a scan reads at most")
    scan_max_line_bytes: int = Field(1 << 20, ge=64, description="Longer input lines are bad")
    scan_memory_mib: int = Field(1024, ge=256, description="Address-space limit of a scanner")
    worker_command: list[str] = Field(
        default_factory=lambda: [sys.executable, "-m", "gpuspool.extract"],
        description="argv prefix of the extraction worker",
    )
    worker_device: str = Field("cuda:0", description='Device the worker uses ("cpu" to simulate)')
    prestart: bool = Field(
        True,
        description="Start the worker of the first waiting job whose GPU has room while that "
        "GPU's reading settles (stable_polls): it imports torch and the tokenizer's code and "
        "loads the tokenizer, then waits for its GPU",
    )
    worker_extra_args: list[str] = Field(
        default_factory=list, description="Appended to every worker's argv"
    )
    job_env: dict[str, str] = Field(
        default_factory=dict,
        description="Extra environment of every job (the daemon's own never reaches a job)",
    )
    scratch_dir: Path = Field(
        Path("/var/tmp/gpuspool"),
        description="Per-job private TMPDIR and caches, <scratch_dir>/<job id>, removed at the end",
    )
    default_batch_seconds: float = Field(320.0, gt=0, description="Padded-seconds batch budget")
    job_timeout_s: float | None = Field(None, gt=0, description="Kill a job running this long")
    fallback_user: str | None = Field(None, description="Runs root-owned jobs; None rejects them")
    allow_root_jobs: bool = Field(
        False, description="Single-user machines only: root-owned jobs run as root"
    )
    metrics_address: str | None = Field(None, description='"127.0.0.1:9404" to serve metrics')
    metrics_dcgm_names: bool = Field(
        False, description="Also serve GPU memory as DCGM_FI_DEV_FB_* (dcgm-exporter's names)"
    )
    webhook_url: str | None = Field(None, description="POSTed a JSON body on finish/failure")
    fair_share_half_life_s: float = Field(
        86400.0,
        ge=0,
        description="Half-life of past GPU usage in fair share (0 = plain FIFO by submission)",
    )
    max_running_per_user: int | None = Field(
        None, ge=1, description="Most running jobs of one submitter (None = no cap)"
    )
    max_gpus_per_user: int | None = Field(
        None, ge=1, description="Most GPUs one submitter's running jobs may use (None = no cap)"
    )
    priority_users: list[str] = Field(
        default_factory=list, description="Users whose jobs may set a priority above 0"
    )
    priority_groups: list[str] = Field(
        default_factory=list, description="Groups whose members may set a priority above 0"
    )
    yield_on_foreign_process: bool = Field(
        False, description="Stop a job when a process gpuspool did not start appears on its GPU"
    )
    yield_when_free_below_gib: float = Field(
        0.0,
        ge=0,
        description="Stop a job when others' processes keep its GPU's free memory under this"
        " (GiB; 0 = off)",
    )
    yield_cooldown_s: float = Field(
        300.0, ge=0, description="A job that yielded skips that GPU until it was this long free"
    )
    max_yields: int = Field(
        3, ge=0, description="Yields of one job, after which it keeps running (and says so)"
    )
    metrics_user_labels: bool = Field(
        True, description="Per-user running/waiting job counts in metrics (a user label)"
    )
    log_format: str = Field("auto", description='"auto", "json" or "console"')
    log_level: str = Field("info", description="debug, info, warning, error")

    @field_validator("gpu_source")
    @classmethod
    def _check_gpu_source(cls, v: str) -> str:
        if v != "nvml" and not (v.startswith("file:") and len(v) > len("file:")):
            raise ValueError('gpu_source must be "nvml" or "file:/path/gpus.json"')
        return v

    @field_validator("ledger_url")
    @classmethod
    def _check_ledger_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if v.startswith(SQLITE_PREFIX):
            if not v.startswith(SQLITE_PREFIX + "/") or len(v) <= len(SQLITE_PREFIX) + 1:
                raise ValueError(
                    "a SQLite ledger_url names an absolute path, like"
                    ' "sqlite:///var/lib/gpuspool/ledger.sqlite3"'
                )
            return v
        if v.startswith(POSTGRES_PREFIXES):
            return v
        raise ValueError('ledger_url must start with "sqlite:///" or "postgresql://"')

    @field_validator("host_name")
    @classmethod
    def _check_host_name(cls, v: str) -> str:
        if not _HOST_NAME.fullmatch(v):
            raise ValueError("host_name must be 1-253 letters, digits, dots, dashes or underscores")
        return v

    @field_validator("host_timeout_s")
    @classmethod
    def _check_host_timeout(cls, v: float, info: ValidationInfo) -> float:
        poll = info.data.get("poll_interval_s")
        if poll is not None and v < 3 * poll:
            raise ValueError(
                f"host_timeout_s must be at least 3 poll intervals ({3 * poll:g} s with"
                f" poll_interval_s = {poll:g}): a busy host must not be taken for a dead one"
            )
        return v

    @field_validator("job_env")
    @classmethod
    def _check_job_env(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ValueError(f"job_env: {key!r} is not a valid variable name")
            if "\x00" in value:
                raise ValueError(f"job_env: the value of {key} contains a NUL byte")
        return v

    @field_validator("log_format")
    @classmethod
    def _check_log_format(cls, v: str) -> str:
        if v not in {"auto", "json", "console"}:
            raise ValueError('log_format must be "auto", "json" or "console"')
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls._toml_path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls._toml_path))
        return tuple(sources)

    # Derived paths: one place names every folder of the spool and the state directory.
    @property
    def incoming_dir(self) -> Path:
        return self.spool_dir / "incoming"

    @property
    def staging_dir(self) -> Path:
        return self.spool_dir / "tmp"

    @property
    def accepted_dir(self) -> Path:
        return self.spool_dir / "accepted"

    @property
    def rejected_dir(self) -> Path:
        return self.spool_dir / "rejected"

    @property
    def status_snapshot_path(self) -> Path:
        """What ``status``/``gpus`` show, published by the daemon for users who cannot open
        the ledger (readable by the spool's group, like the drop folder)."""
        return self.spool_dir / "status" / "status.json"

    @property
    def yielding(self) -> bool:
        """Whether a job may be asked to step aside for another user's process on its GPU."""
        return self.yield_on_foreign_process or self.yield_when_free_below_gib > 0

    @property
    def ledger_location(self) -> str:
        """The ledger's URL: ``ledger_url``, or the SQLite file in ``state_dir`` when unset."""
        return self.ledger_url or f"{SQLITE_PREFIX}{self.state_dir / 'ledger.sqlite3'}"

    @property
    def ledger_shown(self) -> str:
        """The ledger for messages: its file, or its URL with any password hidden."""
        return redact_url(self.ledger_location) if self.ledger_is_shared else str(self.ledger_path)

    @property
    def ledger_is_shared(self) -> bool:
        """Whether the ledger is a PostgreSQL database that several hosts share."""
        return self.ledger_location.startswith(POSTGRES_PREFIXES)

    @property
    def ledger_path(self) -> Path:
        """The SQLite ledger file: the one ``ledger_url`` names, else ``state_dir``'s (also when
        the ledger is shared, so that callers that check for the file still have a path)."""
        if self.ledger_url and self.ledger_url.startswith(SQLITE_PREFIX):
            return Path(self.ledger_url[len(SQLITE_PREFIX) :])
        return self.state_dir / "ledger.sqlite3"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def events_dir(self) -> Path:
        """Per-job worker events (``<id>.events``): the worker → daemon channel."""
        return self.state_dir / "events"


def redact_url(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***`` (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


class ConfigError(Exception):
    """The configuration file or environment is invalid; the message names the file and field.

    ``path`` is the file (None when the settings as a whole are at fault, whatever their
    source), ``field`` the first offending setting (None for a file that is not valid TOML),
    ``problem`` what is wrong with it in plain words.
    """

    def __init__(self, path: Path | None, problem: str, field: str | None = None) -> None:
        where = "".join(f"{part}: " for part in (path, field) if part)
        super().__init__(where + problem)
        self.path, self.field, self.problem = path, field, problem


def _plain(error: Mapping[str, Any]) -> str:
    """One pydantic error in plain words: no error type, no docs URL."""
    kind, msg = str(error.get("type", "")), str(error.get("msg", "invalid"))
    if kind == "extra_forbidden":
        return "unknown setting (misspelled? the shipped gpuspool.toml lists every key)"
    msg = msg.removeprefix("Value error, ").removeprefix("Input should be ")
    msg = "must be " + msg if not str(error.get("msg", "")).startswith("Value error") else msg
    msg = msg.split(", unable to parse")[0]
    if "input" in error and kind != "missing" and not isinstance(error["input"], dict):
        msg += f" (got {error['input']!r})"
    if error.get("loc") == ("min_free_gib",) and error.get("input") == "auto":
        msg += ' ("auto" is a per-job value: set it in a job file or submit --min-free-gib auto)'
    return msg


def _config_error(path: Path, exc: Exception) -> ConfigError:
    """``exc`` from loading ``path`` as a ConfigError naming the file and the first field."""
    if isinstance(exc, ValidationError) and exc.errors():
        errors = exc.errors(include_url=False)
        first = errors[0]
        field = ".".join(str(part) for part in first.get("loc", ())) or None
        problem = _plain(first)
        env_name = f"GPUSPOOL_{field}".upper() if field else ""
        if env_name and env_name in os.environ:
            problem += f" (set by {env_name} in the environment)"
        if len(errors) > 1:
            others = sorted({".".join(str(p) for p in e.get("loc", ())) for e in errors[1:]})
            problem += f"; also invalid: {', '.join(others)}"
        return ConfigError(path, problem, field)
    if isinstance(exc, tomllib.TOMLDecodeError):
        return ConfigError(path, f"not valid TOML: {exc}")
    return ConfigError(path, str(exc))


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Read settings from ``path`` (if it exists, or if it was named explicitly) and the env."""
    toml_path = path if path is not None else DEFAULT_CONFIG_PATH
    if path is not None and not toml_path.exists():
        raise ConfigError(toml_path, "no such config file")

    class _Loaded(Settings):
        _toml_path: ClassVar[Path | None] = toml_path if toml_path.exists() else None

    try:
        loaded = _Loaded(**overrides)
    except (ValidationError, tomllib.TOMLDecodeError, OSError, ValueError) as exc:
        raise _config_error(toml_path, exc) from exc
    return Settings.model_construct(**loaded.model_dump())
