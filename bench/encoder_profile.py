"""Where one encoder call's time goes, on one GPU: shape changes, quantizers, the shape buffers.

The worker's batches all have different shapes (clip count × longest clip). This measures, on
random waveforms and the full-size random-weight tokenizer:

1. the encoder as loaded (its convolutions' 0-d shape buffers on the device, all 32 codebooks
   computed) against the worker's set-up (those buffers on the host, the 16 kept codebooks
   asked for), each on shapes it has not seen (``cold``: cuDNN picks and builds a plan for
   every new convolution shape), the same shapes again (``warm``), and warm calls queued
   without a sync between them; then both on the same inputs, codes compared;
2. a torch profile of one cold call in each set-up (host time in the top operators, device
   kernel time, synchronisations).

Usage: ``python3 bench/encoder_profile.py --tokenizer DIR [--budgets 320 640] [--shapes 8]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from gpuspool.extract.headers import FRAME_SAMPLES, MODEL_SAMPLE_RATE  # noqa: E402  (torch-free)


def shapes(budget_s: float, n: int, seed: int) -> list[tuple[int, int]]:
    """``n`` (batch, samples) shapes filling ``budget_s`` with clips of 1–30 s."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        frames = int(rng.integers(13, 376))
        b = max(1, int(budget_s * MODEL_SAMPLE_RATE) // (frames * FRAME_SAMPLES))
        out.append((b, frames * FRAME_SAMPLES))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--budgets", type=float, nargs="+", default=[320.0, 640.0])
    ap.add_argument("--shapes", type=int, default=8)
    a = ap.parse_args(argv)

    import torch

    from gpuspool.extract.model import CodeEncoder, resolve_device

    device = resolve_device(a.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.deterministic = True
    enc = CodeEncoder(a.tokenizer, device, "fp32")
    model = enc.model.encoder
    nq_valid = enc.num_quantizers

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def call(x: Any, nq: int | None = None) -> Any:
        with torch.inference_mode():
            out = model.encode(input_values=x, num_quantizers=nq, return_dict=True)
            return out.audio_codes[:, :nq_valid]

    rng = np.random.default_rng(1)

    def batch(b: int, n: int) -> Any:
        x = (0.1 * rng.standard_normal((b, 1, n))).astype(np.float32)
        return torch.from_numpy(x).to(device)

    def timed(fn: Any) -> float:
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t

    def buffers_to(dev: Any) -> None:
        for sub in model.modules():
            for name, buf in list(sub._buffers.items()):
                if buf is not None and buf.dim() == 0 and not buf.is_floating_point():
                    sub._buffers[name] = buf.to(dev)

    res: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if cuda else "cpu"}
    res["torch"] = torch.__version__
    res["cudnn"] = torch.backends.cudnn.version() if cuda else None
    call(batch(2, 10 * FRAME_SAMPLES))  # first-call costs (handles, kernels) out of the way
    variants = [
        ("device buffers, 32 codebooks", device, None),
        ("host buffers, 16 codebooks", "cpu", nq_valid),
    ]
    for budget in a.budgets:
        row: dict[str, Any] = {"budget_s": budget}
        for k, (label, buf_dev, nq) in enumerate(variants):
            buffers_to(buf_dev)
            shp = shapes(budget, a.shapes, int(budget) * 10 + k)  # new shapes: cold
            xs = [batch(b, n) for b, n in shp]
            audio = sum(b * n for b, n in shp) / MODEL_SAMPLE_RATE
            cold = [timed(lambda x=x, q=nq: call(x, q)) for x in xs]
            warm = [timed(lambda x=x, q=nq: call(x, q)) for x in xs]

            def queued(xs: list[Any] = xs, nq: int | None = nq) -> None:
                for x in xs:  # no sync between calls, as in the worker
                    call(x, nq)

            row[label] = {
                "cold_audio_s_per_s": round(audio / sum(cold), 1),
                "warm_audio_s_per_s": round(audio / sum(warm), 1),
                "warm_queued_audio_s_per_s": round(audio / timed(queued), 1),
                "cold_ms": [round(t * 1e3, 1) for t in cold],
            }
        # the same inputs through both variants give the same codes
        xs = [batch(b, n) for b, n in shapes(budget, 3, 7)]
        got = []
        for _, buf_dev, nq in variants:
            buffers_to(buf_dev)
            got.append([call(x, nq).cpu() for x in xs])
        row["codes_identical"] = all(torch.equal(p, q) for p, q in zip(got[0], got[1], strict=True))
        res.setdefault("budgets", []).append(row)
        print(json.dumps(row), flush=True)

    # profile one cold and one warm call at the first budget
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    b, n = shapes(a.budgets[0], 1, 999)[0]
    for label, buf_dev in (("cold, device buffers", device), ("cold, host buffers", "cpu")):
        buffers_to(buf_dev)
        x = batch(b, n + FRAME_SAMPLES * (2 if buf_dev == "cpu" else 1))  # a shape not seen yet
        sync()
        with profile(activities=acts) as prof:
            t = time.perf_counter()
            call(x, nq_valid)
            sync()
            wall = time.perf_counter() - t
        evs = prof.key_averages()
        dev_us = sum(e.self_device_time_total for e in evs) if cuda else 0.0
        top = sorted(evs, key=lambda e: e.self_cpu_time_total, reverse=True)[:6]
        syncs = sum(e.count for e in evs if "Synchronize" in e.key)
        res[f"profile_{label}"] = {
            "wall_ms": round(wall * 1e3, 1),
            "device_kernel_ms": round(dev_us / 1e3, 1),
            "synchronize_calls": syncs,
            "top_host_ops_ms": {e.key: round(e.self_cpu_time_total / 1e3, 1) for e in top},
        }
        print(json.dumps({label: res[f"profile_{label}"]}), flush=True)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
