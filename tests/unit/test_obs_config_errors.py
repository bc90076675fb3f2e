"""Config errors in plain words: the file, the field, what is wrong; no pydantic internals."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpuspool.config import ConfigError, load_settings


@pytest.mark.parametrize(
    ("body", "field", "problem"),
    [
        ('min_free_gib = "auto"\n', "min_free_gib", "must be a valid number (got 'auto')"),
        ("poll_interval_s = -1\n", "poll_interval_s", "must be greater than 0 (got -1)"),
        ("poll_intervall_s = 3\n", "poll_intervall_s", "unknown setting"),
        ('gpu_source = "x"\n', "gpu_source", 'gpu_source must be "nvml" or'),
        ('worker_command = "x"\n', "worker_command", "must be a valid list (got 'x')"),
    ],
)
def test_invalid_setting_names_file_and_field(
    tmp_path: Path, body: str, field: str, problem: str
) -> None:
    path = tmp_path / "gpuspool.toml"
    path.write_text(body)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    err = info.value
    assert (err.path, err.field) == (path, field)
    assert err.problem.startswith(problem)
    assert str(err).startswith(f"{path}: {field}: ")
    for internal in ("validation error", "pydantic", "type=", "_Loaded", "\n"):
        assert internal not in str(err)


def test_not_toml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "gpuspool.toml"
    path.write_text("a = = 1\n")
    with pytest.raises(ConfigError, match=r"not valid TOML: .*line 1") as info:
        load_settings(path)
    assert info.value.field is None


def test_several_errors_name_the_others(tmp_path: Path) -> None:
    path = tmp_path / "gpuspool.toml"
    path.write_text('poll_interval_s = -1\nstable_polls = "x"\n')
    with pytest.raises(ConfigError, match="also invalid: stable_polls"):
        load_settings(path)


def test_environment_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUSPOOL_STABLE_POLLS", "many")
    with pytest.raises(ConfigError, match="set by GPUSPOOL_STABLE_POLLS"):
        load_settings()
