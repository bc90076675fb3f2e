"""Where the encoder's time goes on one GPU, and what changes it, on the worker's batch shapes.

A sequence of batches is cut from clips of 1–30 s, as the worker cuts them at a budget (sorted
longest first, ``batch × longest`` at most the budget). Each variant encodes the whole sequence
(waveforms already on the device, each batch queued behind the last, as the worker queues them),
on shapes it has not seen before in that variant, and reports audio-s/s and the share of frames
whose codes equal the worker's set-up's on the same batches. Then a profile of the worker's
set-up: device time by part of the model (convolutional encoder, transformer, downsampling,
quantizer), the busiest kernels, and how busy the device was.

Variants: the worker's set-up; cuDNN's deterministic flag off; cuDNN's benchmark mode; lengths
rounded up to buckets (so shapes repeat) with and without benchmark mode; the other attention
implementation (eager or SDPA); TF32; CUDA graphs replayed per bucketed shape; transformers'
own forwards instead of the worker's (padded copies before each causal convolution, the
attention mask built through ``vmap``: ``model.pad_inside_convolutions``,
``model.build_causal_masks_directly``).

``--host`` adds what one batch costs the host, on shapes new to the process and again on the
same shapes (the device synchronised before each call, so no call waits for room in its queue):
what the GPU libraries spend setting a new shape up shows as the difference.

    PYTHONPATH=SITE:src python3 bench/encoder_variants.py --tokenizer DIR [--budget 320]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gpuspool.extract.headers import FRAME_SAMPLES, MODEL_SAMPLE_RATE


def batch_shapes(frames: list[int], budget_s: float, bucket: int) -> list[list[int]]:
    """The worker's cut (``plan.pack``): clips' frame counts, longest first, in batches whose
    count × longest (rounded up to ``bucket`` frames) fits the budget."""
    budget = int(budget_s * MODEL_SAMPLE_RATE) // FRAME_SAMPLES
    out: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for f in sorted(frames, reverse=True):
        if cur and (len(cur) + 1) * longest > budget:
            out.append(cur)
            cur = []
        if not cur:
            longest = -(-f // bucket) * bucket
        cur.append(f)
    if cur:
        out.append(cur)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--budget", type=float, default=320.0)
    ap.add_argument("--clips", type=int, default=600)
    ap.add_argument("--bucket", type=int, default=25, help="bucket width in frames (25 = 2 s)")
    ap.add_argument("--variants", nargs="*", default=None)
    ap.add_argument("--host", action="store_true", help="time the host's side of each call")
    ap.add_argument("--no-profile", action="store_true", help="skip the kernel profile")
    a = ap.parse_args(argv)

    import torch

    from gpuspool.extract.model import CodeEncoder, resolve_device

    device = resolve_device(a.device)
    cuda = device.type == "cuda"

    def flags(benchmark: bool = False, deterministic: bool = True, tf32: bool = False) -> None:
        torch.backends.cudnn.benchmark = benchmark
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32

    flags()
    enc = CodeEncoder(a.tokenizer, device, "fp32")
    enc.warm_up()
    model = enc.model.encoder
    rng = np.random.default_rng(5)
    frames = [int(x) for x in rng.integers(13, 376, a.clips)]  # 1–30 s
    audio_s = sum(frames) * FRAME_SAMPLES / MODEL_SAMPLE_RATE
    # One waveform per clip: noise shaped like speech loudness, zeros after its end.
    waves = [
        torch.from_numpy((0.1 * rng.standard_normal(f * FRAME_SAMPLES)).astype(np.float32))
        for f in frames
    ]
    order = sorted(range(len(frames)), key=lambda i: -frames[i])

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def batches(bucket: int) -> list[tuple[list[int], Any]]:
        """(clip indices, padded batch on the device) in the worker's order."""
        out = []
        i = 0
        for cut in batch_shapes(frames, a.budget, bucket):
            idx = order[i : i + len(cut)]
            i += len(cut)
            longest = -(-max(frames[j] for j in idx) // bucket) * bucket
            x = torch.zeros((len(idx), longest * FRAME_SAMPLES))
            for r, j in enumerate(idx):
                x[r, : frames[j] * FRAME_SAMPLES] = waves[j]
            out.append((idx, x.to(device)))
        return out

    def run(bs: list[tuple[list[int], Any]], call: Callable[[Any], Any]) -> tuple[float, dict]:
        codes: dict[int, Any] = {}
        sync()
        t = time.perf_counter()
        outs = [(idx, call(x)) for idx, x in bs]
        sync()
        wall = time.perf_counter() - t
        for idx, c in outs:
            c = c.cpu()
            for r, j in enumerate(idx):
                codes[j] = c[r, :, : frames[j]]
        return wall, codes

    def eager(x: Any) -> Any:
        with torch.inference_mode():
            out = model.encode(
                input_values=x.unsqueeze(1), num_quantizers=enc.num_quantizers, return_dict=True
            )
            return out.audio_codes[:, : enc.num_quantizers]

    graphs: dict[tuple[int, ...], tuple[Any, Any, Any]] = {}
    pool = torch.cuda.graph_pool_handle() if cuda else None

    def graphed(x: Any) -> Any:
        key = tuple(x.shape)
        if key not in graphs:
            static = x.clone()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                eager(static)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                out = eager(static)
            graphs[key] = (g, static, out)
        g, static, out = graphs[key]
        static.copy_(x)
        g.replay()
        return out.clone()

    #: Modules whose forward the worker replaced (``model.pad_inside_convolutions``,
    #: ``model.build_causal_masks_directly``): an instance attribute over the class's method.
    shortcuts = [m for m in model.modules() if "forward" in vars(m)]

    def as_transformers(x: Any) -> Any:
        """``eager`` with transformers' own forwards: each convolution convolves a padded copy,
        and the transformer's mask is built through ``vmap``."""
        saved = [(m, vars(m).pop("forward")) for m in shortcuts]
        try:
            return eager(x)
        finally:
            for m, forward in saved:
                vars(m)["forward"] = forward

    attn_classes: dict[str, type] = {}
    try:
        from transformers.models.mimi import modeling_mimi as mm

        attn_classes = {"eager": mm.MimiAttention, "sdpa": mm.MimiSdpaAttention}
    except ImportError:
        pass
    layers = list(model.encoder_transformer.layers)
    loaded_attn = type(layers[0].self_attn)
    print(
        json.dumps(
            {
                "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                "torch": torch.__version__,
                "cudnn": torch.backends.cudnn.version(),
                "attention_as_loaded": loaded_attn.__name__,
                "worker_forwards": len(shortcuts),
                "clips": a.clips,
                "audio_s": round(audio_s, 1),
                "budget_s": a.budget,
            }
        ),
        flush=True,
    )

    def set_attn(cls: type) -> None:
        for layer in layers:
            layer.self_attn.__class__ = cls

    other_attn = next((c for c in attn_classes.values() if c is not loaded_attn), None)
    variants: dict[str, tuple[dict[str, bool], int, Callable[[Any], Any], type | None]] = {
        "worker": ({}, 1, eager, None),
        "deterministic off": ({"deterministic": False}, 1, eager, None),
        "benchmark": ({"benchmark": True, "deterministic": False}, 1, eager, None),
        "buckets": ({}, a.bucket, eager, None),
        "buckets + benchmark": ({"benchmark": True, "deterministic": False}, a.bucket, eager, None),
        "other attention": ({}, 1, eager, other_attn),
        "tf32": ({"tf32": True}, 1, eager, None),
        "buckets + cuda graphs": ({}, a.bucket, graphed, None),
        "buckets + benchmark + cuda graphs": (
            {"benchmark": True, "deterministic": False},
            a.bucket,
            graphed,
            None,
        ),
        "transformers' forwards": ({}, 1, as_transformers, None),
        "worker again": ({}, 1, eager, None),
    }
    ref: dict[int, Any] = {}
    for name, (fl, bucket, call, attn) in variants.items():
        if a.variants and name not in a.variants and name != "worker":
            continue
        if not cuda and call is graphed:
            continue
        flags(**fl)
        if attn is not None:
            set_attn(attn)
        try:
            bs = batches(bucket)
            cold, codes = run(bs, call)
            warm, _ = run(bs, call)
        except Exception as exc:  # a variant that cannot run is reported, not fatal
            print(json.dumps({"variant": name, "error": f"{type(exc).__name__}: {exc}"[:500]}))
            continue
        finally:
            set_attn(loaded_attn)
            flags()
        if not ref:
            ref = codes
        same = sum(int((codes[j] == ref[j]).sum()) for j in ref)
        total = sum(int(ref[j].numel()) for j in ref)
        clips_same = sum(bool(torch.equal(codes[j], ref[j])) for j in ref)
        padded = sum(len(i) * int(x.shape[1]) for i, x in bs) / MODEL_SAMPLE_RATE
        print(
            json.dumps(
                {
                    "variant": name,
                    "batches": len(bs),
                    "distinct_shapes": len({tuple(x.shape) for _, x in bs}),
                    "padding_overhead": round(padded / audio_s - 1, 4),
                    "cold_audio_s_per_s": round(audio_s / cold, 1),
                    "warm_audio_s_per_s": round(audio_s / warm, 1),
                    "entries_equal_to_worker": f"{same}/{total}",
                    "clips_equal": f"{clips_same}/{len(ref)}",
                }
            ),
            flush=True,
        )
        del bs
    graphs.clear()

    if a.host and cuda:
        host_costs(a, batches, eager, sync, flags)
    if not cuda or a.no_profile:
        return
    # Profile of the worker's set-up on its (warm) shapes: parts, kernels, busy share.
    flags()
    bs = batches(1)[:12]
    run(bs, eager)
    marks: dict[str, list[Any]] = {}

    def hook_pair(name: str, mod: Any) -> None:
        def pre(*_: Any) -> None:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            marks.setdefault(name, []).append([ev])

        def post(*_: Any) -> None:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            marks[name][-1].append(ev)

        mod.register_forward_pre_hook(pre)
        mod.register_forward_hook(post)

    for part in ("encoder", "encoder_transformer", "downsample"):
        hook_pair(part, getattr(model, part))
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    run(bs, eager)
    end.record()
    sync()
    parts = {k: round(sum(p[0].elapsed_time(p[1]) for p in v), 1) for k, v in marks.items()}
    total_ms = start.elapsed_time(end)
    parts["quantizer and rest"] = round(total_ms - sum(parts.values()), 1)
    print(json.dumps({"parts_ms": parts, "total_ms": round(total_ms, 1)}), flush=True)

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        run(bs, eager)
        wall = time.perf_counter() - t
    evs = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    dev = sum(e.self_device_time_total for e in evs)
    top = sorted(evs, key=lambda e: e.self_device_time_total, reverse=True)[:30]
    print(
        json.dumps(
            {
                "profiled_wall_ms": round(wall * 1e3, 1),
                "device_busy_ms": round(dev / 1e3, 1),
                "busy_share": round(dev / 1e3 / (wall * 1e3), 3),
            }
        ),
        flush=True,
    )
    for e in top:
        print(
            json.dumps(
                {
                    "kernel": e.key[:140],
                    "ms": round(e.self_device_time_total / 1e3, 2),
                    "share": round(e.self_device_time_total / dev, 4),
                    "calls": e.count,
                }
            )
        )


def host_costs(
    a: argparse.Namespace,
    batches: Callable[[int], list[tuple[list[int], Any]]],
    eager: Callable[[Any], Any],
    sync: Callable[[], None],
    flags: Callable[..., None],
) -> None:
    """Host milliseconds per call, on new shapes then on the same shapes again.

    The new shapes are the worker's batches one frame longer (lengths the variants above did
    not use, as the cut gives each batch its own length), each call made with the device idle.
    """
    import torch

    for name, fl in (("worker", {}), ("deterministic off", {"deterministic": False})):
        flags(**fl)
        bs = [
            (idx, torch.nn.functional.pad(x, (0, FRAME_SAMPLES * (1 + len(fl)))))
            for idx, x in batches(1)
        ]
        row: dict[str, Any] = {"host_ms_per_call": name, "calls": len(bs)}
        for label in ("new_shapes", "same_shapes"):
            ms = []
            for _, x in bs:
                sync()
                t = time.perf_counter()
                eager(x)
                ms.append((time.perf_counter() - t) * 1e3)
            sync()
            ms.sort()
            row[label] = {
                "median": round(ms[len(ms) // 2], 2),
                "mean": round(sum(ms) / len(ms), 2),
                "max": round(ms[-1], 2),
            }
        print(json.dumps(row), flush=True)
        flags()


if __name__ == "__main__":
    main()
