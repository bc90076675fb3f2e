"""Configuration: the shipped file documents every setting, and sources combine as documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gpuspool.config import ConfigError, Settings, load_settings

SHIPPED = Path(__file__).parents[2] / "config" / "gpuspool.toml"


def test_shipped_config_documents_every_setting() -> None:
    """config/gpuspool.toml names every setting (set or commented) and loads as the defaults,
    but for the yield policy, off by default, which the example turns on."""
    text = SHIPPED.read_text()
    named = set(re.findall(r"^#? ?([a-z_]+) = ", text, flags=re.M))
    assert named == set(Settings.model_fields)
    loaded = load_settings(SHIPPED)
    defaults = Settings()
    assert not defaults.yielding and loaded.yield_on_foreign_process
    for key in Settings.model_fields:
        if key not in ("worker_command", "yield_on_foreign_process"):
            assert getattr(loaded, key) == getattr(defaults, key), key


def test_env_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GPUSPOOL_* variables win over the file; the file wins over defaults."""
    cfg = tmp_path / "c.toml"
    cfg.write_text("min_free_gib = 40\npoll_interval_s = 2\n")
    monkeypatch.setenv("GPUSPOOL_MIN_FREE_GIB", "12.5")
    s = load_settings(cfg)
    assert s.min_free_gib == 12.5 and s.poll_interval_s == 2.0 and s.stable_polls == 3


def test_bad_config_names_the_field(tmp_path: Path) -> None:
    """An unknown key or a bad value is an error that names the file and the field."""
    cfg = tmp_path / "c.toml"
    cfg.write_text("poll_intervall_s = 2\n")
    with pytest.raises(ConfigError, match="poll_intervall_s"):
        load_settings(cfg)
    cfg.write_text('gpu_source = "cuda"\n')
    with pytest.raises(ConfigError, match="gpu_source"):
        load_settings(cfg)
    with pytest.raises(ConfigError, match="no such config file"):
        load_settings(tmp_path / "missing.toml")


def test_config_error_is_a_plain_message(tmp_path: Path) -> None:
    """`min_free_gib = "auto"` in the config: one plain line naming the key and the value, no
    pydantic type names or documentation links, and a hint that "auto" is per job."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('min_free_gib = "auto"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(cfg)
    message = str(caught.value)
    assert message.startswith(f"{cfg}: min_free_gib: ") and "(got 'auto')" in message
    assert "per-job" in message
    assert "\n" not in message and "pydantic" not in message and "type=" not in message


def test_host_timeout_must_span_a_few_polls(tmp_path: Path) -> None:
    """A host silent for one slow tick must not be taken for dead: host_timeout_s is at least
    three poll intervals, and the error names the setting and the poll interval."""
    cfg = tmp_path / "c.toml"
    cfg.write_text("poll_interval_s = 5\nhost_timeout_s = 10\n")
    with pytest.raises(ConfigError, match=r"host_timeout_s.*15 s with poll_interval_s = 5"):
        load_settings(cfg)
    cfg.write_text("poll_interval_s = 5\nhost_timeout_s = 15\n")
    assert load_settings(cfg).host_timeout_s == 15.0


def test_job_hosts_key_takes_host_names_only() -> None:
    from pydantic import ValidationError

    from gpuspool.models import JobSpec

    base = {"input": "/d/in.jsonl", "output": "/d/out.jsonl", "tokenizer": "t"}
    assert JobSpec.model_validate({**base, "hosts": ["gpu-1", "gpu.2"]}).hosts == ["gpu-1", "gpu.2"]
    for bad in (["a b"], [], ["x\n"], "gpu-1", [1]):
        with pytest.raises(ValidationError, match="hosts"):
            JobSpec.model_validate({**base, "hosts": bad})
