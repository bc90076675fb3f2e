"""Summarise py-spy's raw (collapsed) stacks of an extraction worker run.

For each file: samples per thread; the main thread's samples by phase (the imports, the model
load, the encoding loop ``Run._consume``); and where the loop's samples end (the innermost
Python frame, which holds the time spent in C below it).

    python3 bench/pyspy_summary.py pyspy_320.txt [pyspy_640.txt ...]
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

PHASES = (
    ("encoding loop", "Run._consume"),
    ("model load", "CodeEncoder.__init__"),
    ("tokenizer imports", "import_tokenizer_stack"),
)


def summarise(path: str, top: int = 12) -> str:
    threads: collections.Counter[str] = collections.Counter()
    phases: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        threads[frames[0].split(": ", 1)[-1]] += n
        if "MainThread" not in frames[0]:
            continue
        names = [f.split(" (")[0] for f in frames]
        phase = next((p for p, fn in PHASES if fn in names), "other")
        phases[phase] += n
        if phase == "encoding loop":
            where = "/".join(frames[-1].rpartition(" (")[2].split("/")[-2:])
            leaves[f"{names[-1]} ({where}"] += n
    out = [f"== {path}", "samples per thread: " + ", ".join(f"{k} {v}" for k, v in
                                                          threads.most_common(8))]  # fmt: skip
    main = sum(phases.values())
    out.append("main thread: " + ", ".join(f"{k} {v / main:.0%}" for k, v in phases.most_common()))
    loop = sum(leaves.values())
    out.append(f"encoding loop, innermost Python frame ({loop} samples):")
    out += [f"  {v / loop:6.1%}  {k}" for k, v in leaves.most_common(top)]
    return "\n".join(out)


if __name__ == "__main__":
    print("\n".join(summarise(p) for p in sys.argv[1:]))
