"""Fixtures for the extraction worker: a tiny random-weight tokenizer and synthesized audio."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from gpuspool.extract.synth import synth_dataset

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 clips of 0.4–7 s: every sample rate, mono and stereo, WAV/FLAC/MP3; returns the JSONL."""
    return synth_dataset(tmp_path_factory.mktemp("ds"), 16, 0.4, 7.0, seed=3, stereo_fraction=0.4)


@pytest.fixture(scope="session")
def official_tokenizer(tiny_tokenizer: Path) -> Any:
    """The tiny tokenizer loaded the official way, for reference codes."""
    from qwen_tts import Qwen3TTSTokenizer

    return Qwen3TTSTokenizer.from_pretrained(str(tiny_tokenizer), device_map="cpu")


class Result:
    """Exit code and parsed stdout events of one worker run."""

    def __init__(self, code: int, stdout: str):
        self.code = code
        self.stdout = stdout
        self.events = [json.loads(line) for line in stdout.splitlines() if line.strip()]

    def of(self, name: str) -> list[dict[str, Any]]:
        """Events with this name."""
        return [e for e in self.events if e["event"] == name]

    def one(self, name: str) -> dict[str, Any]:
        """The single event with this name."""
        got = self.of(name)
        assert len(got) == 1, f"expected one {name!r} event, got {self.events}"
        return got[0]


def run_extract(*args: str | os.PathLike[str]) -> Result:
    """Run the worker in this process; capture its stdout events."""
    from gpuspool.extract.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main([str(a) for a in args])
    return Result(code, buf.getvalue())


def spawn_extract(
    *args: str | os.PathLike[str], env: Mapping[str, str] | None = None, **popen: Any
) -> subprocess.Popen[str]:
    """Start the worker as ``python -m gpuspool.extract`` in a child process, with ``env`` added
    to this one's environment; ``popen`` overrides ``subprocess.Popen``'s arguments (stderr is
    dropped unless it says otherwise)."""
    environ = dict(os.environ)
    environ["PYTHONPATH"] = str(SRC) + os.pathsep + environ.get("PYTHONPATH", "")
    environ.update(env or {})
    kwargs: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.DEVNULL, **popen}
    return subprocess.Popen(
        [sys.executable, "-m", "gpuspool.extract", *[str(a) for a in args]],
        text=True,
        env=environ,
        **kwargs,
    )


@pytest.fixture
def extract() -> Any:
    """The in-process runner: ``extract(*args) -> Result``."""
    return run_extract


@pytest.fixture
def spawn() -> Any:
    """The child-process runner: ``spawn(*args) -> Popen``."""
    return spawn_extract


#: The worker's flags for the interrupt tests: small batches, so a run has many checkpoints.
CHECKPOINTED_ARGS = ["--batch-seconds", "2", "--sort-window", "12", "--loader-workers", "2"]


@pytest.fixture(scope="session")
def many_clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 short clips, so a run has dozens of batches and checkpoints to interrupt."""
    from gpuspool.extract.synth import synth_dataset

    return synth_dataset(tmp_path_factory.mktemp("many"), 48, 0.3, 2.0, seed=11)


@pytest.fixture(scope="session")
def uninterrupted(
    many_clips: Path, tiny_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory
) -> bytes:
    """Output bytes of one run of ``many_clips`` that nobody interrupts."""
    out = tmp_path_factory.mktemp("u") / "out.jsonl"
    r = run_extract("--input", many_clips, "--output", out, "--tokenizer", tiny_tokenizer,
                    *CHECKPOINTED_ARGS)  # fmt: skip
    assert r.code == 0
    return out.read_bytes()
