"""``gpuspool extract`` in several set-ups on one GPU, the same synthetic set, side by side.

Each ``--variant NAME=ARGS`` is a run of the worker with ``ARGS`` added to its command line (the
first variant is the reference; ``--baseline-src`` adds, as the reference, the worker of
another tree, say the commit before a change). ``--rounds`` runs every variant that many
times, the order turned each round, so that a machine's drift falls on all of them alike. Each
run reports its steady rate (reading the input to writing the output), how long the main
thread spent launching batches and waiting for the device, its batches and its peak; each
variant's output is compared entry by entry with the reference's.

    PYTHONPATH=SITE:src python3 bench/worker_variants.py --config-dir CONFIG --work /scratch \\
        --hours 8 --variant default= --variant 'bucket 2 s=--shape-bucket 2' --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from extract_bench import (  # noqa: E402
    _dataset,
    _last_json,
    _step,
    compare,
    full_tokenizer,
    worker_command,
)
from official_side_by_side import gpu_name  # noqa: E402

#: Summary fields each run reports.
FIELDS = (
    "processing_s",
    "launching_s",
    "waiting_for_device_s",
    "waiting_for_audio_s",
    "batches",
    "startup_s",
    "peak_gpu_reserved_gib",
)


#: Runs the worker of another tree: its src/ first on the path (argv[1]), then its CLI.
BASELINE = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from gpuspool.extract.cli import main; sys.exit(main())"
)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config-dir", help="the released tokenizer's config (full-size tokenizer)")
    ap.add_argument("--tokenizer", help="an existing tokenizer folder instead")
    ap.add_argument("--work", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--hours", type=float, default=8.0)
    ap.add_argument("--budget", type=float, default=320.0)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--variant", action="append", required=True, help="NAME=EXTRA ARGS")
    ap.add_argument(
        "--baseline-src",
        help="another tree's src/: a first variant, 'baseline', runs the worker from it",
    )
    a = ap.parse_args(argv)

    variants = [tuple(v.split("=", 1)) for v in a.variant]
    if a.baseline_src:
        variants.insert(0, ("baseline", ""))
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    tok = full_tokenizer(work, a.config_dir, a.tokenizer)
    jl, meta = _dataset(work / f"set_{a.hours:g}h", a.hours, os.cpu_count() or 4)
    res: dict[str, Any] = {"argv": sys.argv[1:], "gpu": gpu_name(), "set": meta, "runs": []}
    print(json.dumps({"gpu": res["gpu"], "set": meta}), flush=True)
    _step("warm the page cache", [sys.executable, "-c", "from qwen_tts import Qwen3TTSTokenizer"])
    outputs = {name: work / f"out_{i}.jsonl" for i, (name, _) in enumerate(variants)}
    for r in range(a.rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        for name, extra in order:
            out = outputs[name]
            cmd = [*worker_command(jl, tok, out, a.budget, a.device), *shlex.split(extra)]
            if name == "baseline" and a.baseline_src:
                cmd = [cmd[0], "-c", BASELINE, str(Path(a.baseline_src).resolve()), *cmd[3:]]
            stdout, wall = _step(name, cmd)
            s = _last_json(stdout, "summary")
            row = {
                "variant": name,
                "round": r,
                "args": extra,
                "wall_s": round(wall, 2),
                "steady_audio_s_per_s": round(
                    s["audio_s_done"] / (s["scan_s"] + s["processing_s"]), 1
                ),
            } | {k: s.get(k) for k in FIELDS}
            res["runs"].append(row)
            print(json.dumps(row), flush=True)
            Path(a.json).write_text(json.dumps(res, indent=1))
    ref = outputs[variants[0][0]]
    for name, out in list(outputs.items())[1:]:
        row = {"compared": f"{name} against {variants[0][0]}"} | compare(ref, out, False)
        res.setdefault("agreement", []).append(row)
        print(json.dumps(row), flush=True)
    Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
