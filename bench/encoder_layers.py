"""Where one batch's device time goes inside the encoder, layer by layer, and what other ways of
running each convolution would cost on the same input and weights.

For each batch shape (``ROWSxSECONDS``, the worker's cut at a budget: 20x16 is 320 s), the
worker's encoder (``model.CodeEncoder``, fp32, cuDNN deterministic as the worker sets it) runs
``--repeats`` times with CUDA events around every layer of the convolutional encoder (inside
the residual blocks too), the transformer and the downsampling; the quantizer is the rest of
the call (the whole call timed in runs without the events). Each repeat starts on an idle
device, so the first layer's time includes its launch. Then each zero-padded convolution runs
alone on the input it got, as the worker runs it and in other layouts and modes: NCL as the
worker (cuDNN heuristics), NCL with cuDNN's benchmark search, channels-last (NHWC) with
heuristics and with the search, and TF32 for reference. Each alternative's output is compared
with the worker's: the largest difference and the share of values bit for bit equal (an output
not bit-equal can still give the same codes, and one that is can only give the same codes).

    PYTHONPATH=SITE:src python3 bench/encoder_layers.py --config-dir CONFIG --work /scratch \\
        --shapes 20x16 64x5 --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from extract_bench import full_tokenizer  # noqa: E402
from gpuspool.extract.headers import FRAME_SAMPLES, MODEL_SAMPLE_RATE  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config-dir", help="the released tokenizer's config (full-size tokenizer)")
    ap.add_argument("--tokenizer", help="an existing tokenizer folder instead")
    ap.add_argument("--work", default="/tmp/encoder-layers")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--shapes", nargs="+", default=["20x16", "64x5"])
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--json", help="also write every line here")
    a = ap.parse_args(argv)

    import torch

    from gpuspool.extract.model import CodeEncoder, resolve_device

    tok = str(full_tokenizer(Path(a.work), a.config_dir, a.tokenizer))

    lines: list[dict[str, Any]] = []

    def out(d: dict[str, Any]) -> None:
        lines.append(d)
        print(json.dumps(d), flush=True)

    device = resolve_device(a.device)

    def flags(benchmark: bool = False, tf32: bool = False) -> None:
        """cuDNN and cuBLAS as the worker sets them (``--tf32`` lets deterministic go)."""
        torch.backends.cudnn.benchmark = benchmark
        torch.backends.cudnn.deterministic = not tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32

    flags()
    enc = CodeEncoder(tok, device, "fp32")
    enc.warm_up()
    mimi = enc.model.encoder
    out(
        {
            "device": torch.cuda.get_device_name(device),
            "torch": torch.__version__,
            "cudnn": torch.backends.cudnn.version(),
        }
    )

    from transformers.models.mimi.modeling_mimi import MimiConv1d, MimiResnetBlock

    timed: dict[str, torch.nn.Module] = {}
    for i, layer in enumerate(mimi.encoder.layers):
        if isinstance(layer, MimiResnetBlock):
            for j, sub in enumerate(layer.block):
                timed[f"layers.{i}.block.{j} {type(sub).__name__}"] = sub
            timed[f"layers.{i} residual add"] = layer  # whole block, the add derived below
        else:
            timed[f"layers.{i} {type(layer).__name__}"] = layer
    timed["transformer"] = mimi.encoder_transformer
    timed["downsample"] = mimi.downsample

    def median(xs: list[float]) -> float:
        return round(statistics.median(xs), 3)

    def events_ms(call: Callable[[], Any], repeats: int) -> float:
        times = []
        for _ in range(repeats):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            call()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        return median(times)

    def one_shape(shape: str) -> None:
        rows, secs = shape.split("x")
        b = int(rows)
        length = -(-int(float(secs) * MODEL_SAMPLE_RATE) // FRAME_SAMPLES) * FRAME_SAMPLES
        gen = torch.Generator(device=device).manual_seed(5)
        x = 0.1 * torch.randn((b, length), device=device, generator=gen)
        audio_s = b * length / MODEL_SAMPLE_RATE

        def call() -> Any:
            return enc.launch_tensor(x, [])  # the worker's call, codes copied back

        # -- whole call -----------------------------------------------------------------------
        flags()
        call()
        whole = events_ms(call, a.repeats)
        flags(tf32=True)
        call()
        whole_tf32 = events_ms(call, a.repeats)
        flags()
        out(
            {
                "shape": shape,
                "audio_s": audio_s,
                "whole_ms": whole,
                "whole_audio_s_per_s": round(audio_s / whole * 1e3, 1),
                "whole_tf32_ms": whole_tf32,
                "whole_tf32_audio_s_per_s": round(audio_s / whole_tf32 * 1e3, 1),
            }
        )

        # -- per layer ------------------------------------------------------------------------
        per: dict[str, list[float]] = defaultdict(list)
        pending: list[tuple[str, Any, Any]] = []
        inputs: dict[str, torch.Tensor] = {}
        hooks = []
        for name, mod in timed.items():

            def pre(m: Any, args: Any, name: str = name) -> None:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                m._bench_start = ev
                if isinstance(m, MimiConv1d) and name not in inputs:
                    inputs[name] = args[0]

            def post(m: Any, args: Any, result: Any, name: str = name) -> None:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                pending.append((name, m._bench_start, ev))

            hooks.append(mod.register_forward_pre_hook(pre))
            hooks.append(mod.register_forward_hook(post))
        for _ in range(a.repeats):
            pending.clear()
            call()
            torch.cuda.synchronize(device)
            for name, s, e in pending:
                per[name].append(s.elapsed_time(e))
        for h in hooks:
            h.remove()
        ms = {name: median(v) for name, v in per.items()}
        for name in list(ms):
            if name.endswith("residual add"):
                i = name.split()[0]
                inner = sum(v for k, v in ms.items() if k.startswith(i + ".block."))
                ms[name] = round(ms[name] - inner, 3)
        ms["quantizer and rest"] = round(whole - sum(ms.values()), 3)
        for name, v in sorted(ms.items(), key=lambda kv: -kv[1]):
            out({"shape": shape, "part": name, "ms": v, "share": round(v / whole, 4)})

        # -- each convolution, other ways -----------------------------------------------------
        convs = {
            n: m
            for n, m in timed.items()
            if isinstance(m, MimiConv1d) and n in inputs and m.pad_mode == "constant"
        }
        for name, m in convs.items():
            xin = inputs[name]
            conv = m.conv
            left = int(m.padding_total)
            with torch.inference_mode():
                ref = m(xin)
            n_out = ref.shape[-1]
            w4 = conv.weight.unsqueeze(2).contiguous(memory_format=torch.channels_last)
            x4 = xin.unsqueeze(2).contiguous(memory_format=torch.channels_last)

            def ncl(conv: Any = conv, xin: Any = xin, left: int = left, n: int = n_out) -> Any:
                y = torch.nn.functional.conv1d(
                    xin, conv.weight, conv.bias, conv.stride, left, conv.dilation, conv.groups
                )
                return y[..., :n]

            def nhwc(conv: Any = conv, w4: Any = w4, x4: Any = x4, left: int = left) -> Any:
                return torch.nn.functional.conv2d(
                    x4,
                    w4,
                    conv.bias,
                    (1, conv.stride[0]),
                    (0, left),
                    (1, conv.dilation[0]),
                    conv.groups,
                )

            row: dict[str, Any] = {
                "shape": shape,
                "conv": name,
                "in": list(xin.shape),
                "out_channels": conv.out_channels,
                "kernel": conv.kernel_size[0],
                "stride": conv.stride[0],
                "gflop": round(
                    2
                    * b
                    * n_out
                    * conv.out_channels
                    * conv.in_channels
                    * conv.kernel_size[0]
                    / conv.groups
                    / 1e9,
                    2,
                ),
            }
            variants: dict[str, tuple[Callable[[], Any], dict[str, bool]]] = {
                "worker": (lambda m=m, xin=xin: m(xin), {}),
                "ncl benchmark": (ncl, {"benchmark": True}),
                "nhwc": (nhwc, {}),
                "nhwc benchmark": (nhwc, {"benchmark": True}),
                "tf32": (ncl, {"tf32": True}),
            }
            for vname, (fn, fl) in variants.items():
                flags(**fl)
                with torch.inference_mode():
                    try:
                        y = fn()
                        t = events_ms(fn, a.repeats)
                    except RuntimeError as exc:
                        row[vname] = str(exc).splitlines()[0][:120]
                        continue
                    finally:
                        flags()
                y = y.squeeze(2)[..., :n_out] if y.dim() == 4 else y
                same = (y == ref).float().mean().item()
                diff = (y - ref).abs().max().item()
                row[vname] = {"ms": t, "bit_equal": round(same, 6), "max_diff": diff}
            out(row)

    for shape in a.shapes:
        one_shape(shape)
        torch.cuda.empty_cache()

    if a.json:
        Path(a.json).write_text("".join(json.dumps(d) + "\n" for d in lines))


if __name__ == "__main__":
    main()
