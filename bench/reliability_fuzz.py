"""Feed N hypothesis-generated job files through the real intake and record the figures.

    .venv/bin/python bench/reliability_fuzz.py [--examples 10000] [--seed 5]
        [--out bench/results/reliability_fuzz.txt]

Exit status 1 if any file crashed the intake, was decided other than once, a valid one was
rejected or a certainly invalid one accepted (see ``tests/reliability/jobfuzz.py``).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.reliability.jobfuzz import run_fuzz  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--examples", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/reliability_fuzz.txt")
    a = ap.parse_args(argv)
    shm = Path("/dev/shm")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else None) as tmp:
        report = run_fuzz(Path(tmp), a.examples, a.seed)
    cmd = f".venv/bin/python bench/reliability_fuzz.py --examples {a.examples} --seed {a.seed}"
    lines = [
        f"# {cmd}",
        f"# {time.strftime('%Y-%m-%d')} · {platform.machine()} · {platform.python_version()}"
        f" · {time.monotonic() - t0:.0f} s",
        report.summary(),
        *[f"FAILURE: {f}" for f in report.failures[:50]],
        "",
    ]
    text = "\n".join(lines)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)
    print(text)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
