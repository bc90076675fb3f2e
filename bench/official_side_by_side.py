"""The unmodified official ``finetuning/prepare_data.py`` and ``gpuspool extract``, side by side.

One command, one GPU, each run a fresh process, on synthetic sets of 1–30 s clips (mixed sample
rates, channels and formats; ``extract_bench._dataset``) and the full-size random-weight
tokenizer built from the released config:

1. for each ``--hours`` set: the official script as published (its path is
   ``--official-script``; it is run as it is, from the data folder, with the PyTorch defaults
   it gets: TF32 convolutions on), then ``gpuspool extract`` at each budget (``--budgets`` on
   the first set, ``--other-budgets`` on the others) and with ``--tf32`` at ``--tf32-budgets``
   (first set only);
2. on the set named by ``--loader-set``, ``gpuspool extract`` at the default budget with each
   ``--loaders`` count of loader processes.

Every run reports its wall time (the whole process: interpreter, imports, model load, work,
output) and its peak GPU memory as ``nvidia-smi`` saw it (sampled every 100 ms); gpuspool's
runs add their summary (steady rate, start-up, peak). Codes are compared entry by entry:
gpuspool's budgets against each other (all frames) and against the official output (each
clip's last frame excluded: the official batch pads clips to the longest, not to whole frames,
so the last frame sees other samples).

    PYTHONPATH=SITE:src python3 bench/official_side_by_side.py --official-script PATH \\
        --config-dir CONFIG --work /scratch --hours 8 2 --json OUT.json
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from extract_bench import (  # noqa: E402
    _dataset,
    _env,
    _last_json,
    _step,
    compare,
    full_tokenizer,
    worker_command,
)
from prestart import Gated  # noqa: E402

#: What the log line of a gpuspool run shows.
SHOWN = ("wall_s", "x_official_whole_process", "steady_audio_s_per_s", "nvidia_smi_peak_gib")
#: What it adds for a prestarted run, whose ``wall_s`` counts from the go line.
GATED_SHOWN = ("exec_to_exit_s", "x_official_exec_to_exit", "waiting_rss_gib")


class GpuPeak:
    """Peak of ``nvidia-smi``'s used memory on one GPU while a run lasts (GiB)."""

    def __init__(self, index: int = 0):
        self.peak_mib = 0
        self._proc: subprocess.Popen[str] | None = None
        try:
            self._proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    f"--id={index}",
                    "--query-gpu=memory.used",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "100",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        except FileNotFoundError:  # no GPU here: no figure
            return
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                self.peak_mib = max(self.peak_mib, int(line.strip()))
            except ValueError:
                continue

    def stop(self) -> float | None:
        if self._proc is None:
            return None
        self._proc.terminate()
        self._proc.wait()
        self._thread.join(timeout=2)
        return round(self.peak_mib / 1024, 2)


def gpu_name() -> str:
    """The GPU's name as nvidia-smi gives it (this process never starts CUDA), or "cpu"."""
    try:
        p = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "cpu"
    return p.stdout.strip().splitlines()[0]


def timed(label: str, argv: list[str], cwd: Path | None = None) -> dict[str, Any]:
    """Run one process (``_step``); its wall time, peak GPU memory and summary (if any)."""
    peak = GpuPeak()
    try:
        stdout, wall = _step(label, argv, cwd)
    finally:
        peak_gib = peak.stop()
    out: dict[str, Any] = {"wall_s": round(wall, 2), "nvidia_smi_peak_gib": peak_gib}
    with contextlib.suppress(RuntimeError):
        out["summary"] = _last_json(stdout, "summary")
    return out


def timed_prestarted(argv: list[str]) -> dict[str, Any]:
    """Run one worker as ``prestart`` does: started gated, let go on GPU 0 once it waits.

    ``wall_s`` is from the go line to the exit (the time the GPU was held), ``exec_to_exit_s``
    the whole process.
    """
    worker = Gated(argv, _env(), cwd=os.getcwd())
    peak = GpuPeak()
    try:
        stdout = worker.go("0")
    finally:
        peak_gib = peak.stop()
    return {
        "wall_s": worker.go_to_exit_s,
        "exec_to_exit_s": worker.exec_to_exit_s,
        "waiting_rss_gib": worker.waiting_rss_gib,
        "nvidia_smi_peak_gib": peak_gib,
        "summary": _last_json(stdout, "summary"),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--official-script", required=True, help="finetuning/prepare_data.py")
    ap.add_argument("--official-commit", default="", help="the commit it was taken from")
    ap.add_argument("--config-dir", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--hours", type=float, nargs="+", default=[8.0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[160.0, 320.0, 640.0, 1280.0])
    ap.add_argument("--other-budgets", type=float, nargs="*", default=[320.0])
    ap.add_argument("--tf32-budgets", type=float, nargs="*", default=[320.0])
    ap.add_argument(
        "--prestarted-budgets",
        type=float,
        nargs="*",
        default=[],
        help="budgets run prestarted (gated until its imports are done), on every set",
    )
    ap.add_argument("--loaders", type=int, nargs="*", default=[])
    ap.add_argument("--loader-set", type=float, default=None, help="hours of the set swept")
    a = ap.parse_args(argv)

    from importlib.metadata import version

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    script = Path(a.official_script).resolve()
    res: dict[str, Any] = {
        "argv": sys.argv[1:],
        "env": {
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
            "torch": version("torch"),
            "transformers": version("transformers"),
            "gpu": gpu_name(),
        },
        "official_script": {
            "commit": a.official_commit,
            "sha256": hashlib.sha256(script.read_bytes()).hexdigest(),
        },
        "sets": [],
    }

    def save() -> None:
        Path(a.json).write_text(json.dumps(res, indent=1))

    tok = full_tokenizer(work, a.config_dir)
    # The stacks once, untimed: no timed run pays for a cold page cache that a later one skips.
    subprocess.run(
        [sys.executable, "-c", "from qwen_tts import Qwen3TTSTokenizer"],
        env=_env(),
        capture_output=True,
        check=True,
    )
    for k, hours in enumerate(a.hours):
        set_dir = work / f"set_{hours:g}h"
        t = time.monotonic()
        jl, meta = _dataset(set_dir, hours, os.cpu_count() or 4)
        meta["synth_s"] = round(time.monotonic() - t, 1)
        row: dict[str, Any] = {"hours": hours, "dataset": meta, "gpuspool": [], "agreement": []}
        res["sets"].append(row)
        print(f"[bench] {hours:g} h: {meta}", flush=True)
        off_out = set_dir / "official.jsonl"
        cmd = [
            sys.executable,
            str(script),
            "--device",
            a.device,
            "--tokenizer_model_path",
            str(tok),
            "--input_jsonl",
            str(jl),
            "--output_jsonl",
            str(off_out),
        ]
        row["official"] = timed("official", cmd, cwd=jl.parent)
        row["official"]["audio_s_per_s"] = round(meta["audio_s"] / row["official"]["wall_s"], 1)
        print(f"[bench] official: {row['official']}", flush=True)
        save()
        runs = [(b, False, False) for b in (a.budgets if k == 0 else a.other_budgets)]
        runs += [(b, True, False) for b in (a.tf32_budgets if k == 0 else [])]
        runs += [(b, False, True) for b in a.prestarted_budgets]
        for budget, tf32, gated in runs:
            name = f"{budget:g}{' tf32' if tf32 else ''}{' prestarted' if gated else ''}"
            out = set_dir / f"gpuspool_{name.replace(' ', '_')}.jsonl"
            cmd = worker_command(jl, tok, out, budget, a.device, tf32=tf32)
            r = timed_prestarted(cmd) if gated else timed("gpuspool", cmd)
            s = r.pop("summary")
            r |= {
                "budget_s": budget,
                "tf32": tf32,
                "prestarted": gated,
                "output": str(out),
                "audio_s_per_s": round(meta["audio_s"] / r["wall_s"], 1),
                "x_official_whole_process": round(row["official"]["wall_s"] / r["wall_s"], 2),
                "steady_audio_s_per_s": round(
                    s["audio_s_done"] / (s["scan_s"] + s["processing_s"]), 1
                ),
                "summary": {
                    key: s.get(key)
                    for key in (
                        "startup_s",
                        "import_s",
                        "model_load_s",
                        "processing_s",
                        "scan_s",
                        "peak_gpu_gib",
                        "peak_gpu_reserved_gib",
                        "batches",
                        "waiting_for_audio_s",
                        "gate_wait_s",
                    )
                },
            }
            if gated:  # like for like: from the exec, the imports done while waiting included
                r["x_official_exec_to_exit"] = round(
                    row["official"]["wall_s"] / r["exec_to_exit_s"], 2
                )
            row["gpuspool"].append(r)
            print(
                f"[bench] gpuspool {name}: "
                f"{ {x: r[x] for x in (*SHOWN, *GATED_SHOWN) if x in r} } "
                f"{r['summary']}",
                flush=True,
            )
            save()
        plain = [r for r in row["gpuspool"] if not r["tf32"]]
        first = next((r for r in plain if r["budget_s"] == 320.0 and not r["prestarted"]), plain[0])
        for r in plain:
            if r is not first:
                c = compare(Path(first["output"]), Path(r["output"]), False)
                c["what"] = (
                    f"gpuspool {first['budget_s']:g} vs {r['budget_s']:g}"
                    f"{' prestarted' if r['prestarted'] else ''}, all frames"
                )
                row["agreement"].append(c)
        for r in row["gpuspool"]:
            c = compare(Path(r["output"]), off_out, True)
            c["what"] = (
                f"gpuspool {r['budget_s']:g}{' --tf32' if r['tf32'] else ''}"
                f"{' prestarted' if r['prestarted'] else ''} vs the "
                "official script (its defaults), last frames excluded"
            )
            row["agreement"].append(c)
        for c in row["agreement"]:
            print(
                f"[bench] {c['what']}: {c['identical']}/{c['entries']} entries "
                f"({c['identical_pct']:.5f} %), clips {c['clips_identical']}/{c['clips']}",
                flush=True,
            )
        save()
        if a.loaders and a.loader_set == hours:
            row["loaders"] = []
            for n in a.loaders:
                out = set_dir / f"gpuspool_loaders_{n}.jsonl"
                r = timed(
                    "loaders",
                    [*worker_command(jl, tok, out, 320.0, a.device), "--loader-workers", str(n)],
                )
                s = r.pop("summary")
                r |= {
                    "loaders": n,
                    "steady_audio_s_per_s": round(
                        s["audio_s_done"] / (s["scan_s"] + s["processing_s"]), 1
                    ),
                    "waiting_for_audio_s": s.get("waiting_for_audio_s"),
                    "identical_to_default": compare(Path(first["output"]), out, False)[
                        "identical_pct"
                    ],
                }
                row["loaders"].append(r)
                print(f"[bench] loaders {n}: {r}", flush=True)
                save()
    save()


if __name__ == "__main__":
    main()
