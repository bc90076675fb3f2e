"""Load: the real daemon with 10,000 queued jobs and 8 simulated GPUs churning for minutes.

    .venv/bin/python bench/reliability_load.py [--jobs 10000] [--duration-s 240]
        [--out bench/results/reliability_load.txt]

See ``tests/reliability/load.py`` for what is checked. Exit status 1 if a job or a transition was
lost, a job was left running, or the daemon's RSS grew by more than 10% (and 10 MiB) between the
first and the last minute.
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

from tests.reliability.load import LoadRun  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--duration-s", type=float, default=240.0)
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/reliability_load.txt")
    a = ap.parse_args(argv)
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else None) as tmp:
        report = LoadRun(Path(tmp), jobs=a.jobs, duration_s=a.duration_s).run()
    first, last = report.rss_window(True), report.rss_window(False)
    grew = last - first > max(10.0, 0.1 * first)
    cmd = (
        f".venv/bin/python bench/reliability_load.py --jobs {a.jobs} --duration-s {a.duration_s:g}"
    )
    text = "\n".join(
        [
            f"# {cmd}",
            f"# {time.strftime('%Y-%m-%d')} · {platform.machine()} · {platform.python_version()}",
            report.summary(),
            "RSS samples (s, MiB): "
            + ", ".join(
                f"{t:.0f}:{r:.1f}" for t, r in report.rss_mib[:: max(1, len(report.rss_mib) // 40)]
            ),
            "",
        ]
    )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)
    print(text)
    bad = report.lost_jobs + report.lost_transitions + report.left_running + report.missing_outputs
    return 1 if bad or grew or report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
