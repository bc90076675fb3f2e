"""Crash safety: SIGKILL at several points and SIGTERM, then resume, give the same bytes."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from tests.extract.conftest import CHECKPOINTED_ARGS as ARGS

from gpuspool.exitcodes import ExitCode

pytest.importorskip("torch")
pytest.importorskip("qwen_tts")


def _ckpt(out: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(Path(str(out) + ".partial.ckpt").read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _wait_then_signal(
    proc: subprocess.Popen[str], out: Path, ready: Any, sig: int, timeout: float = 120.0
) -> None:
    """Poll the checkpoint until ``ready(ckpt)``; then send ``sig``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        ck = _ckpt(out)
        if ck is not None and ready(ck):
            proc.send_signal(sig)
            return
        time.sleep(0.002)
    raise AssertionError(f"run ended (rc={proc.poll()}) before the kill point")


def test_sigkill_at_several_points_then_resume(
    spawn: Any, many_clips: Path, tiny_tokenizer: Path, tmp_path: Path, uninterrupted: bytes
) -> None:
    """Three SIGKILLs (early, mid-window with pending results, late) lose and duplicate nothing."""
    out = tmp_path / "out.jsonl"
    args = ["--input", many_clips, "--output", out, "--tokenizer", tiny_tokenizer, *ARGS]
    points = [
        lambda ck: ck["next_line"] >= 4,
        lambda ck: ck["pending_bytes"] > 0 and ck["next_line"] >= 12,
        lambda ck: ck["next_line"] >= 36,
    ]
    seen_lines = []
    for ready in points:
        proc = spawn(*args)
        _wait_then_signal(proc, out, ready, signal.SIGKILL)
        proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        ck = _ckpt(out)
        assert ck is not None
        seen_lines.append(ck["next_line"])
        # The partial file never holds more than the checkpoint vouches for, modulo the tail
        # that a resume cuts off; what it vouches for is a prefix of the uninterrupted output.
        part = Path(str(out) + ".partial").read_bytes()[: ck["partial_bytes"]]
        assert uninterrupted.startswith(part)
    assert seen_lines == sorted(seen_lines)
    proc = spawn(*args)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    events = [json.loads(x) for x in stdout.splitlines()]
    start = next(e for e in events if e["event"] == "start")
    assert start["resumed"] is True and start["resume_line"] > 1
    assert out.read_bytes() == uninterrupted
    assert not Path(str(out) + ".partial").exists()


def test_sigterm_checkpoints_and_exits_143(
    spawn: Any, many_clips: Path, tiny_tokenizer: Path, tmp_path: Path, uninterrupted: bytes
) -> None:
    """SIGTERM finishes the batch in flight, checkpoints, exits 143; a rerun completes the file."""
    out = tmp_path / "out.jsonl"
    args = ["--input", many_clips, "--output", out, "--tokenizer", tiny_tokenizer, *ARGS]
    proc = spawn(*args)
    _wait_then_signal(proc, out, lambda ck: ck["next_line"] >= 6, signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.INTERRUPTED
    events = [json.loads(x) for x in stdout.splitlines()]
    assert events[-1]["event"] == "error" and events[-1]["exit_code"] == 143
    assert "SIGTERM" in events[-1]["reason"]
    ck = _ckpt(out)
    assert ck is not None and ck["next_line"] >= 6
    size = Path(str(out) + ".partial").stat().st_size
    assert size == ck["partial_bytes"]  # a clean stop leaves no unvouched tail
    proc = spawn(*args)
    proc.communicate(timeout=120)
    assert proc.returncode == 0
    assert out.read_bytes() == uninterrupted


def test_finished_run_whose_cleanup_was_cut_short(
    extract: Any, many_clips: Path, tiny_tokenizer: Path, tmp_path: Path, uninterrupted: bytes
) -> None:
    """If the run died after renaming OUT but before removing its checkpoint, a rerun exits 0."""
    out = tmp_path / "out.jsonl"
    out.write_bytes(uninterrupted)
    Path(str(out) + ".partial.ckpt").write_text(
        json.dumps({"version": 1, "fingerprint": {}, "complete": True, "lines_done": 48})
    )
    r = extract("--input", many_clips, "--output", out, "--tokenizer", tiny_tokenizer, *ARGS)
    assert r.code == 0
    assert r.one("summary")["lines_done"] == 48
    assert out.read_bytes() == uninterrupted
    assert not Path(str(out) + ".partial.ckpt").exists()


@pytest.mark.parametrize(
    "renamed_out", [False, True], ids=["before-out-rename", "after-out-rename"]
)
def test_finished_run_cut_short_keeps_output_and_report(
    extract: Any, many_clips: Path, tiny_tokenizer: Path, tmp_path: Path, uninterrupted: bytes,
    renamed_out: bool,
) -> None:  # fmt: skip
    """A run that died after marking its checkpoint complete: the rerun renames what is left,
    the finished output is not encoded again and the skip report is not lost."""
    out = tmp_path / "out.jsonl"
    report = Path(str(out) + ".skipped.jsonl")
    (out if renamed_out else Path(str(out) + ".partial")).write_bytes(uninterrupted)
    Path(str(report) + ".partial").write_text('{"line": 3, "reason": "x"}\n')
    Path(str(out) + ".partial.ckpt").write_text(
        json.dumps(
            {"version": 1, "fingerprint": {}, "complete": True, "lines_done": 47,
             "lines_skipped": 1}
        )
    )  # fmt: skip
    r = extract("--input", many_clips, "--output", out, "--tokenizer", tiny_tokenizer, *ARGS)
    assert r.code == 0
    assert r.one("summary")["already_complete"] is True
    assert out.read_bytes() == uninterrupted
    assert report.read_text() == '{"line": 3, "reason": "x"}\n'
    leftovers = [".partial", ".partial.ckpt", ".partial.pending"]
    assert not [s for s in leftovers if Path(str(out) + s).exists()]
    assert not Path(str(report) + ".partial").exists()
