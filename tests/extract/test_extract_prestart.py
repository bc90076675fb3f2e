"""A worker started before its GPU is free (``prestart``): it imports, waits at its gate, and runs
with what the daemon's go line sets; the gate closed, it stops with nothing done."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.conftest import wait_until
from tests.extract.conftest import SRC, spawn_extract

from gpuspool.exitcodes import ExitCode
from gpuspool.protocol import GATE_FD_ENV, encode_go

pytest.importorskip("torch")
pytest.importorskip("qwen_tts")


def _worker(*args: str | os.PathLike[str], gate: int | None) -> subprocess.Popen[str]:
    # No GPU visible: what the daemon sets until the go line names one.
    env = {"CUDA_VISIBLE_DEVICES": ""} | ({} if gate is None else {GATE_FD_ENV: str(gate)})
    pass_fds = () if gate is None else (gate,)
    return spawn_extract(*args, env=env, stderr=subprocess.PIPE, pass_fds=pass_fds)


def _gated(*args: str | os.PathLike[str]) -> tuple[subprocess.Popen[str], int]:
    """The worker with a gate; the write end of it."""
    read, write = os.pipe()
    try:
        return _worker(*args, gate=read), write
    finally:
        os.close(read)


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _idle(pid: int) -> bool:
    """Whether the process used no CPU for half a second (it waits)."""
    before = _cpu_s(pid)
    time.sleep(0.5)
    return _cpu_s(pid) == before


def _summary(stdout: str) -> dict[str, object]:
    (summary,) = [e for e in map(json.loads, stdout.splitlines()) if e["event"] == "summary"]
    return summary


def test_a_gated_worker_imports_loads_waits_then_writes_the_same_codes(
    dataset: Path, tiny_tokenizer: Path, tmp_path: Path
) -> None:
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(tiny_tokenizer, tokenizer)
    args = ["--input", dataset, "--tokenizer", tokenizer, "--device", "cpu"]
    plain = _worker(*args, "--output", tmp_path / "plain.jsonl", gate=None)
    assert plain.wait(timeout=300) == 0
    out = tmp_path / "gated.jsonl"
    proc, gate = _gated(*args, "--output", out)
    try:
        maps = Path(f"/proc/{proc.pid}/maps")
        # torch is imported before the gate, then the process waits, having written nothing.
        wait_until(lambda: "libtorch" in maps.read_text() and _idle(proc.pid), timeout=120)
        assert proc.poll() is None and not out.exists()
        assert not Path(str(out) + ".partial").exists()
        # The tokenizer was loaded before the gate too: the run needs its folder no more.
        tokenizer.rename(tmp_path / "gone")
        os.write(gate, encode_go({"CUDA_VISIBLE_DEVICES": ""}))
    finally:
        os.close(gate)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert out.read_bytes() == (tmp_path / "plain.jsonl").read_bytes()
    summary = _summary(stdout)
    assert isinstance(summary["gate_wait_s"], float) and summary["gate_wait_s"] > 0
    assert _summary(plain.communicate()[0])["gate_wait_s"] is None


@pytest.mark.parametrize("line", [None, b"not json\n", b'{"PATH": "/tmp"}\n'])
def test_a_closed_gate_or_a_line_that_is_no_go_stops_it_with_nothing_done(
    dataset: Path, tiny_tokenizer: Path, tmp_path: Path, line: bytes | None
) -> None:
    out = tmp_path / "out.jsonl"
    proc, gate = _gated("--input", dataset, "--output", out, "--tokenizer", tiny_tokenizer,
                        "--device", "cpu")  # fmt: skip
    if line is not None:
        os.write(gate, line)
    os.close(gate)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == ExitCode.INTERRUPTED and stdout == ""
    assert "not started" in stderr
    assert not out.exists() and not Path(str(out) + ".partial").exists()


def test_cuda_started_before_the_go_line_runs_the_worker_again_from_its_exec(
    tiny_tokenizer: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CUDA reads ``CUDA_VISIBLE_DEVICES`` once, when its driver starts: should anything have
    started it during the imports, the worker execs itself again with the GPU it was given."""
    from gpuspool.extract import cli, startup

    assert startup.cuda_sees_no_gpu() is False  # no driver loaded in this process
    read, write = os.pipe()
    os.write(write, encode_go({"CUDA_VISIBLE_DEVICES": "GPU-given"}))
    os.close(write)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(startup, "cuda_sees_no_gpu", lambda: True)
    calls: list[tuple[str, list[str], str | None]] = []

    def execv(path: str, argv: list[str]) -> None:
        calls.append((path, list(argv), os.environ.get("CUDA_VISIBLE_DEVICES")))
        raise SystemExit(0)

    monkeypatch.setattr(os, "execv", execv)
    with pytest.raises(SystemExit):
        cli._wait_for_gpu(read, str(tiny_tokenizer), "fp32")
    assert calls == [(sys.executable, sys.orig_argv, "GPU-given")]


#: Wraps torch's ways into CUDA, then runs what a gated worker does before its go line (the
#: imports and the tokenizer's load on the CPU) and prints each call it saw.
ASKS_CUDA = r"""
import os, sys, torch
seen = []
def wrap(owner, name):
    real = getattr(owner, name)
    def call(*args, **kwargs):
        seen.append(name)
        return real(*args, **kwargs)
    setattr(owner, name, call)
for name in ("is_available", "device_count", "init", "_lazy_init", "current_device",
             "get_device_capability", "get_device_properties", "set_device", "mem_get_info"):
    wrap(torch.cuda, name)
wrap(torch._C, "_cuda_getDeviceCount")
from gpuspool.extract import cli
read, write = os.pipe()
os.write(write, b'{"CUDA_VISIBLE_DEVICES": "0"}\n')
os.close(write)
assert cli._wait_for_gpu(read, sys.argv[1], "fp32") is not None
print(seen)
"""


def test_nothing_before_the_go_line_asks_cuda(tiny_tokenizer: Path) -> None:
    """CUDA reads ``CUDA_VISIBLE_DEVICES`` when its driver starts: if the imports or the load
    on the CPU asked it anything, it would start with no GPU visible (then the worker has to exec
    itself again, losing what the prestart saved). The GPU test checks the same on a GPU."""
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", ASKS_CUDA, str(tiny_tokenizer)],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
