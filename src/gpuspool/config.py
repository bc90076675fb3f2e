"""Settings: a TOML file plus ``GPUSPOOL_*`` environment variables (pydantic-settings).

Precedence, highest first: keyword arguments (the CLI), environment variables, the TOML file,
defaults. ``config/gpuspool.toml`` documents every key. Must not import anything of the daemon.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_CONFIG_PATH = Path("/etc/gpuspool/gpuspool.toml")


class Settings(BaseSettings):
    """Every setting of the daemon and the CLI, with its default."""

    model_config = SettingsConfigDict(env_prefix="GPUSPOOL_", extra="forbid", frozen=True)

    #: The TOML file read by ``load_settings`` (set per load, not a setting itself).
    _toml_path: ClassVar[Path | None] = None

    spool_dir: Path = Field(Path("/var/spool/gpuspool"), description="Spool root: incoming/, ...")
    state_dir: Path = Field(Path("/var/lib/gpuspool"), description="Ledger and per-job logs")
    poll_interval_s: float = Field(5.0, gt=0, description="Seconds between NVML polls (ticks)")
    stable_polls: int = Field(3, ge=1, description="Consecutive polls a GPU must fit a job")
    min_free_gib: float = Field(100.0, ge=0, description="Default free-memory threshold (GiB)")
    gpu_source: str = Field("nvml", description='"nvml" or "file:/path/gpus.json"')
    max_attempts: int = Field(3, ge=1, description="Starts before a retryable failure is final")
    retry_backoff_s: float = Field(60.0, ge=0, description="First retry delay; doubles each time")
    stop_grace_s: float = Field(30.0, ge=0, description="SIGTERM to SIGKILL grace for a job")
    max_job_file_bytes: int = Field(65536, gt=0, description="Larger job files are rejected")
    progress_log_interval_s: float = Field(30.0, ge=0, description="Min gap of job_progress logs")
    intake_max_files: int = Field(200, ge=1, description="Job files intake takes per tick")
    intake_max_ms: float = Field(250.0, gt=0, description="Time intake may spend per tick (ms)")
    intake_retry_s: float = Field(30.0, ge=0, description="Retry delay after a daemon-side error")
    requeue_check_s: float = Field(
        300.0, gt=0, description="How often accepted/ is checked for jobs the ledger lacks"
    )
    rejected_keep_days: float = Field(14.0, gt=0, description="Days rejected/ entries are kept")
    scan_concurrency: int = Field(4, ge=1, le=64, description="Scanner processes at once")
    scan_batch: int = Field(16, ge=1, le=256, description="Jobs of one user per scanner")
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
    worker_extra_args: list[str] = Field(
        default_factory=list, description="Appended to every worker's argv"
    )
    default_batch_seconds: float = Field(320.0, gt=0, description="Padded-seconds batch budget")
    job_timeout_s: float | None = Field(None, gt=0, description="Kill a job running this long")
    fallback_user: str | None = Field(None, description="Runs root-owned jobs; None rejects them")
    allow_root_jobs: bool = Field(
        False, description="Single-user machines only: root-owned jobs run as root"
    )
    metrics_address: str | None = Field(None, description='"127.0.0.1:9404" to serve metrics')
    webhook_url: str | None = Field(None, description="POSTed a JSON body on finish/failure")
    log_format: str = Field("auto", description='"auto", "json" or "console"')
    log_level: str = Field("info", description="debug, info, warning, error")

    @field_validator("gpu_source")
    @classmethod
    def _check_gpu_source(cls, v: str) -> str:
        if v != "nvml" and not (v.startswith("file:") and len(v) > len("file:")):
            raise ValueError('gpu_source must be "nvml" or "file:/path/gpus.json"')
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
    def ledger_path(self) -> Path:
        return self.state_dir / "ledger.sqlite3"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"


class ConfigError(Exception):
    """The configuration file or environment is invalid; the message names the field."""


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Read settings from ``path`` (if it exists, or if it was named explicitly) and the env."""
    toml_path = path if path is not None else DEFAULT_CONFIG_PATH
    if path is not None and not toml_path.exists():
        raise ConfigError(f"{toml_path}: no such config file")

    class _Loaded(Settings):
        _toml_path: ClassVar[Path | None] = toml_path if toml_path.exists() else None

    try:
        loaded = _Loaded(**overrides)
    except Exception as exc:  # pydantic.ValidationError or a TOML decode error
        raise ConfigError(f"{toml_path}: {exc}") from exc
    return Settings.model_construct(**loaded.model_dump())
