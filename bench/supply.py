"""How fast the worker's CPU side can feed an encoder: everything but the encoder, for several
loader counts.

The worker runs in this process as ``gpuspool extract`` runs (scan, batches cut at the budget,
loader processes decoding and resampling, the collating thread, the encoding thread, JSON
serialisation and the checkpointed writer), with its encoder replaced by one that answers at
once with random codes (as many digits to write as real ones). Its "model load" waits
``--model-load-s`` (the real one took 1.2–1.9 s on an H200), so that the loaders start up and
decode the first batches behind it, as in the worker, not inside the timed part. Its steady rate
is then what the host can supply and write per second. Every run gets a fresh output; the set is
the bench's synthetic one (``extract_bench``), each run its own process pool.

    PYTHONPATH=SITE:src python3 bench/supply.py --work /scratch --hours 8 --loaders 1 2 4 8 15
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from extract_bench import _dataset  # noqa: E402


class InstantEncoder:
    """Stands in for ``model.CodeEncoder``: random codes, no device, no time but the load's."""

    load_s = 1.5

    def __init__(self, tokenizer: str, device: Any, dtype: str = "fp32", started: Any = None):
        if started is not None:
            started.wait()
        self.device = device
        self.rng = np.random.default_rng(0)

    def host_batch(self, rows: int, length: int) -> tuple[Any, Any]:
        return np.empty((rows, length), dtype=np.float32), None

    def launch(self, batch: Any, frames: list[int], held: Any = None) -> list[int]:
        return frames

    def collect(self, frames: list[int]) -> list[Any]:
        return [self.rng.integers(0, 2048, (f, 16)) for f in frames]

    def warm_up(self) -> None:
        time.sleep(self.load_s)

    def memory(self) -> None:
        return None

    def remeasure_context(self) -> None:
        pass


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", required=True)
    ap.add_argument("--hours", type=float, default=8.0)
    ap.add_argument("--budget", type=float, default=320.0)
    ap.add_argument("--loaders", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--model-load-s", type=float, default=1.5)
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args(argv)

    import contextlib
    import io

    from gpuspool.extract import model
    from gpuspool.extract.cli import main as extract

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    jl, meta = _dataset(work / f"set_{a.hours:g}h", a.hours, os.cpu_count() or 4)
    rows: list[dict[str, Any]] = [{"cores": os.cpu_count(), "set": meta}]
    print(json.dumps(rows[0]), flush=True)
    tok = work / "no-tokenizer"  # never loaded: the stand-in takes its place
    tok.mkdir(exist_ok=True)
    InstantEncoder.load_s = a.model_load_s
    model.CodeEncoder = InstantEncoder  # type: ignore[assignment,misc]
    for n in a.loaders:
        out = work / f"supply_{n}.jsonl"
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = extract(
                [
                    "--input",
                    str(jl),
                    "--output",
                    str(out),
                    "--tokenizer",
                    str(tok),
                    "--device",
                    "cpu",
                    "--batch-seconds",
                    str(a.budget),
                    "--loader-workers",
                    str(n),
                    "--overwrite",
                    "--no-resume",
                ]
            )
        summary = [json.loads(x) for x in buf.getvalue().splitlines() if '"summary"' in x]
        if code != 0 or not summary:
            raise SystemExit(f"the worker exited {code} with {n} loaders:\n{buf.getvalue()}")
        s = summary[-1]
        row = {
            "loaders": n,
            "supply_audio_s_per_s": round(s["audio_s_done"] / (s["scan_s"] + s["processing_s"]), 1),
            "processing_s": s["processing_s"],
            "waiting_for_audio_s": s["waiting_for_audio_s"],
            "scan_s": s["scan_s"],
            "batches": s["batches"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        out.unlink()
    if a.json:
        Path(a.json).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
