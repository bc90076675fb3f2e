"""The long crash-kill run: SIGKILL the real daemon and workers for N cycles, then check.

    .venv/bin/python bench/reliability_crashkill.py [--cycles 100] [--seed 20260501]
        [--real-fraction 0.125] [--out bench/results/reliability_crashkill.txt]

Builds a tiny random tokenizer and a short synthetic dataset, takes the real worker's output of
one uninterrupted run as the reference, then runs ``tests.reliability.crashkill.CrashKill`` in a
temporary folder and writes its figures (and any problem) to ``--out``. Exit status 1 if any job
was lost, run twice or corrupted.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.reliability.crashkill import CrashKill, reference_run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cycles", type=int, default=100)
    ap.add_argument("--seed", type=int, default=20260501)
    ap.add_argument("--real-fraction", type=float, default=0.125)
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/reliability_crashkill.txt")
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args(argv)
    from gpuspool.extract.synth import synth_dataset

    with tempfile.TemporaryDirectory(prefix="gpuspool-crashkill-") as tmp:
        root = Path(tmp)
        tok = root / "tok"
        subprocess.run(
            [sys.executable, "-m", "gpuspool.extract.tiny", str(tok)],
            check=True,
            capture_output=True,
        )
        data = synth_dataset(root / "audio", 24, min_s=1.0, max_s=5.0, seed=21)
        reference = reference_run(data, tok, root / "ref.jsonl")
        work = root / "run"
        work.mkdir()
        run = CrashKill(
            work,
            seed=a.seed,
            cycles=a.cycles,
            real_fraction=a.real_fraction,
            tokenizer=tok,
            real_input=data,
            real_reference=reference,
            real_cycles=frozenset({0}),
            log=print if a.verbose else None,
        )
        report = run.run()
    cmd = f".venv/bin/python bench/reliability_crashkill.py --cycles {a.cycles} --seed {a.seed}"
    text = "\n".join(
        [
            f"# {cmd}",
            f"# {time.strftime('%Y-%m-%d')} · {platform.machine()} · {platform.python_version()}",
            report.summary(),
            "",
        ]
    )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)
    print(text)
    bad = report.lost_jobs + report.duplicated_runs + report.corrupted_outputs
    return 1 if bad or report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
