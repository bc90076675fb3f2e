"""What ``prestart`` saves: from the moment a job's GPU is given to its first batch on the device.

Side by side, alternating, in one command: the worker started with its GPU (as without
``prestart``: the GPU waits for the exec, the imports and the model load), and the worker started
with a gate (as ``prestart`` does), let go once its imports are done and it waits (no CPU used
for half a second). For the first, the summary's ``startup_s`` (exec to the first batch) is the
time the GPU waited; for the second, ``startup_s - gate_wait_s`` (the go line to the first
batch). Each run is a fresh ``python -m gpuspool.extract`` on a small synthetic set; the outputs
of both kinds are compared byte for byte, and the resident memory of a worker waiting at its gate
is recorded.

    PYTHONPATH=src python3 bench/prestart.py --device cpu --runs 3               # tiny tokenizer
    PYTHONPATH=SITE:src python3 bench/prestart.py --config-dir CONFIG --device cuda:0
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpuspool.protocol import GATE_FD_ENV, encode_go
from worker_startup import _env, prepare


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


def _wait_idle(pid: int, timeout: float = 300.0) -> float:
    """Wait until ``pid`` has used no CPU for half a second; seconds waited."""
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        before = _cpu_ticks(pid)
        time.sleep(0.5)
        if _cpu_ticks(pid) == before:
            return time.monotonic() - t
    raise SystemExit(f"worker {pid} still busy after {timeout:g} s")


def _rss_gib(pid: int) -> float:
    """Resident memory of ``pid`` (GiB): what a worker waiting at its gate holds of the host."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / (1 << 20), 3)
    return float("nan")


class Gated:
    """A worker started as ``prestart`` starts it: no GPU, a gate; :meth:`go` lets it on ``gpu``.

    ``exec_to_exit_s`` counts from the exec, ``go_to_exit_s`` from the go line: the time the GPU
    was held. ``waiting_rss_gib`` is the resident memory of the worker waiting at its gate.
    """

    def __init__(self, cmd: list[str], env: dict[str, str], cwd: str | Path = "/"):
        env = dict(env, CUDA_VISIBLE_DEVICES="")
        read, self._write = os.pipe()
        env[GATE_FD_ENV] = str(read)
        self._errors = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed in go)
        self._t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._errors, text=True,
                                     env=env, cwd=cwd, pass_fds=(read,))  # fmt: skip
        os.close(read)
        _wait_idle(self.proc.pid)
        self.waiting_rss_gib = _rss_gib(self.proc.pid)

    def go(self, gpu: str) -> str:
        """Write the go line, wait for the worker's exit; its stdout, or stop with why."""
        t = time.monotonic()
        os.write(self._write, encode_go({"CUDA_VISIBLE_DEVICES": gpu}))
        os.close(self._write)
        stdout, _ = self.proc.communicate()
        end = time.monotonic()
        self.go_to_exit_s, self.exec_to_exit_s = round(end - t, 2), round(end - self._t0, 2)
        self._errors.seek(0)
        err = self._errors.read()
        self._errors.close()
        if self.proc.returncode != 0:
            raise SystemExit(f"worker failed ({self.proc.returncode}): {err[-2000:]}")
        return stdout


def run(argv: list[str], out: Path, gpu: str, gated: bool) -> dict[str, Any]:
    """One worker run, with its GPU or with a gate; its summary's start-up figures."""
    cmd = [sys.executable, "-m", "gpuspool.extract", *argv, "--output", str(out), "--overwrite"]
    rss = None
    if gated:
        worker = Gated(cmd, _env())
        rss = worker.waiting_rss_gib
        stdout = worker.go(gpu)
    else:
        p = subprocess.run(cmd, capture_output=True, text=True, cwd="/", check=False,
                           env=dict(_env(), CUDA_VISIBLE_DEVICES=gpu))  # fmt: skip
        if p.returncode != 0:
            raise SystemExit(f"worker failed ({p.returncode}): {p.stderr[-2000:]}")
        stdout = p.stdout
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    summary = next(e for e in events if e["event"] == "summary")
    waited = summary.get("gate_wait_s") or 0.0
    return {
        "given_to_first_batch_s": round(summary["startup_s"] - waited, 3),
        "import_s": summary["import_s"],
        "model_load_s": summary["model_load_s"],
        "gate_wait_s": summary.get("gate_wait_s"),
        "waiting_rss_gib": rss,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp)")
    ap.add_argument("--config-dir", default=None, help="released config: full-size tokenizer")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--gpu", default="0", help="CUDA_VISIBLE_DEVICES the go line names")
    ap.add_argument("--runs", type=int, default=3, help="runs of each kind, alternating")
    ap.add_argument("--clips", type=int, default=24)
    ap.add_argument("--json", type=Path, default=None, help="write all numbers here")
    a = ap.parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="prestart-"))
    tok, data = prepare(work, a.config_dir, a.clips)
    args = ["--input", str(data), "--tokenizer", str(tok), "--device", a.device]
    rows: dict[str, list[dict[str, Any]]] = {"with its GPU": [], "prestarted": []}
    outputs: set[bytes] = set()
    for i in range(a.runs):
        for kind, gated in (("with its GPU", False), ("prestarted", True)):
            out = work / f"out_{int(gated)}.jsonl"
            row = run(args, out, a.gpu, gated)
            outputs.add(out.read_bytes())
            rows[kind].append(row)
            print(f"run {i + 1} {kind:12} {json.dumps(row)}", flush=True)
    same = len(outputs) == 1
    print(f"\noutputs of all {2 * a.runs} runs identical: {same}")
    print(f"{'':14}{'GPU given → first batch (median)':>34}{'imports':>10}{'model load':>12}")
    for kind, got in rows.items():
        med = {k: statistics.median(r[k] for r in got)
               for k in ("given_to_first_batch_s", "import_s", "model_load_s")}  # fmt: skip
        print(f"{kind:14}{med['given_to_first_batch_s']:>32.2f} s{med['import_s']:>8.2f} s"
              f"{med['model_load_s']:>10.2f} s")  # fmt: skip
    if a.json is not None:
        a.json.write_text(json.dumps({"device": a.device, "runs": rows, "identical": same}))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
