"""`gpuspool demo`, captured as CI or a pipe would (no TTY, 80 columns): it passes, prints the
job's computed need (not the threshold), reports progress while torch loads, keeps lines whole,
and removes the temporary folder it made."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.skipif(os.geteuid() != 0, reason="the temporary folder is the root default")
def test_demo_captured() -> None:
    pytest.importorskip("qwen_tts")
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    done = subprocess.run(
        [sys.executable, "-m", "gpuspool.cli", "demo"],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )  # fmt: skip
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    need = re.search(r"it needs ≈([\d.]+) GiB .*; threshold 100 GiB", out)
    assert need and float(need[1]) < 100, out
    assert "needs 100 GiB" not in out
    # Progress while the tokenizer builds: a timed line at least every few seconds.
    stamps = [float(m[1]) for m in re.finditer(r"^\s+(\d+\.\d)s ", out, re.M)]
    assert stamps and stamps[0] < 6.0
    assert all(b - a < 10.0 for a, b in itertools.pairwise(stamps)), stamps
    # Captured at 80 columns, a long line stays one line (never broken mid-sentence).
    assert any(len(line) > 80 for line in out.splitlines())
    assert re.search(r"^4\. submitted job [0-9a-f]{12}: .* so it must wait$", out, re.M), out
    work = Path(re.search(r"^work folder: (\S+)$", out, re.M)[1])  # type: ignore[index]
    assert work.name.startswith("gpuspool-demo-") and not work.exists()
    assert f"removed the temporary work folder {work}" in out
