"""Benchmark: gpuspool extract against the official prepare_data.py method, on one GPU.

One command does everything (``all``): build a random-weight tokenizer (the released architecture
with ``--config-dir``, else the tiny one), synthesize at least ``--hours`` of 1–30 s clips with
mixed sample rates, channels and formats, then run, each in a fresh process:

1. the official method: ``Qwen3TTSTokenizer.from_pretrained(dir, device_map=device)``, read all
   lines, ``encode`` paths in batches of 32 in file order (padded to the longest), fp32, write
   at the end (the logic of finetuning/prepare_data.py);
2. ``python -m gpuspool.extract`` at each ``--budgets`` setting (default: full fp32), and with
   ``--tf32`` at each ``--tf32-budgets`` setting;
   plus, on the first ``--subset`` lines, the official batching in shuffled line order (TF32 on,
   PyTorch's default) and in file order with TF32 off, to show how much the official codes
   themselves move with batch composition under TF32;
3. the GPU-only limit: the encoder alone on waveforms already decoded, batched and copied to
   the GPU, at several budgets; and peak memory of the costliest batch at several budgets and
   of single long clips, against the estimate.

It prints a report and writes ``extract_bench.json`` / ``.txt`` to ``--out``. Codes are compared
entry by entry: gpuspool against the official output (each clip's last frame excluded) and
gpuspool against itself across budgets (all frames).

Children: ``official``, ``gpuonly``; ``table RESULTS.json`` recomputes the estimate table with
the current constants of gpuspool.estimate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

GIB = float(1 << 30)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _step(label: str, argv: list[str], cwd: Path | None = None) -> tuple[str, float]:
    """Run one measured step in its own process; its stdout and wall time, or stop with why."""
    t = time.monotonic()
    p = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, check=False)
    wall = time.monotonic() - t
    if p.returncode:
        raise SystemExit(
            f"{label} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-4000:]}"
        )
    return p.stdout, wall


def worker_command(
    jl: Path, tok: Path, out: Path, budget: float, device: str, *, tf32: bool = False
) -> list[str]:
    """The command line of one measured ``gpuspool extract`` run (a fresh output each time)."""
    cmd = [sys.executable, "-m", "gpuspool.extract", "--input", str(jl), "--output", str(out),
           "--tokenizer", str(tok), "--device", device, "--batch-seconds", f"{budget:g}",
           "--overwrite", "--no-resume", "--progress-interval-s", "2"]  # fmt: skip
    return [*cmd, "--tf32"] if tf32 else cmd


def _last_json(stdout: str, event: str | None = None) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            d = json.loads(line)
            if event is None or d.get("event") == event:
                return dict(d)
    raise RuntimeError(f"no JSON result in output:\n{stdout[-2000:]}")


# ---------------------------------------------------------------------------------------------
# children
# ---------------------------------------------------------------------------------------------
def cmd_official(a: argparse.Namespace) -> None:
    """The official method, timed (run with cwd = the input's folder, as users run it)."""
    t_start = time.monotonic()
    import torch
    from qwen_tts import Qwen3TTSTokenizer

    from gpuspool.extract.model import nonallocator_gib

    t_imported = time.monotonic()
    tok = Qwen3TTSTokenizer.from_pretrained(a.tokenizer, device_map=a.device)
    cuda = a.device.startswith("cuda")
    if a.variants:
        _official_variants(a, tok, torch)
        return
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t_loaded = time.monotonic()
    with open(a.input) as f:
        total_lines = [json.loads(line.strip()) for line in f.readlines()]
    final_lines: list[dict[str, Any]] = []
    batch_lines: list[dict[str, Any]] = []
    batch_audios: list[str] = []
    for line in total_lines:
        batch_lines.append(line)
        batch_audios.append(line["audio"])
        if len(batch_lines) >= 32:
            enc = tok.encode(batch_audios)
            for code, bl in zip(enc.audio_codes, batch_lines, strict=True):
                bl["audio_codes"] = code.cpu().tolist()
                final_lines.append(bl)
            batch_lines.clear()
            batch_audios.clear()
    if batch_audios:
        enc = tok.encode(batch_audios)
        for code, bl in zip(enc.audio_codes, batch_lines, strict=True):
            bl["audio_codes"] = code.cpu().tolist()
            final_lines.append(bl)
    with open(a.output, "w") as f:
        for line in final_lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    t_end = time.monotonic()
    res: dict[str, Any] = {
        "import_s": t_imported - t_start,
        "load_s": t_loaded - t_imported,
        "processing_s": t_end - t_loaded,
        "lines": len(final_lines),
    }
    if cuda:
        ctx, src = nonallocator_gib(torch.device(a.device))
        res.update(
            max_allocated_gib=torch.cuda.max_memory_allocated() / GIB,
            max_reserved_gib=torch.cuda.max_memory_reserved() / GIB,
            context_gib=ctx,
            context_source=src,
        )
        res["peak_gpu_gib"] = res["max_allocated_gib"] + ctx
        res["peak_gpu_reserved_gib"] = res["max_reserved_gib"] + ctx
    print(json.dumps(res))


def _official_variants(a: argparse.Namespace, tok: Any, torch: Any) -> None:
    """The official batching on the first --limit lines: TF32 in shuffled line order, and
    TF32 off (full fp32, deterministic cuDNN) in file order. Writes OUT.rev / OUT.fp32."""
    lines = [json.loads(x) for x in Path(a.input).read_text().splitlines()[: a.limit]]
    res: dict[str, Any] = {}
    import random

    shuffled = list(lines)
    random.Random(0).shuffle(shuffled)  # other batch neighbours for every clip
    for name, order, tf32 in (("rev", shuffled, True), ("fp32", lines, False)):
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.deterministic = not tf32
        t = time.monotonic()
        with open(f"{a.output}.{name}", "w") as f:
            for i in range(0, len(order), 32):
                chunk = order[i : i + 32]
                enc = tok.encode([x["audio"] for x in chunk])
                for code, x in zip(enc.audio_codes, chunk, strict=True):
                    f.write(json.dumps(x | {"audio_codes": code.cpu().tolist()}) + "\n")
        res[name] = time.monotonic() - t
    print(json.dumps(res))


def cmd_gpuonly(a: argparse.Namespace) -> None:
    """Encoder alone on pre-loaded GPU tensors (throughput), and peak memory points."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from gpuspool.estimate import need_gib
    from gpuspool.extract.audio import load_padded
    from gpuspool.extract.headers import FRAME_SAMPLES, Clip, inspect_line, iter_lines
    from gpuspool.extract.model import CodeEncoder, nonallocator_gib, resolve_device
    from gpuspool.extract.plan import batch_cost, pack

    device = resolve_device(a.device)
    enc = CodeEncoder(a.tokenizer, device, "fp32")
    inp = Path(a.input)
    clips: list[Clip] = []
    for lineno, raw, end in iter_lines(inp):
        c = inspect_line(raw, lineno, inp.resolve().parent, end)
        assert isinstance(c, Clip)
        clips.append(c)
    with ThreadPoolExecutor(os.cpu_count() or 4) as ex:
        loaded = list(ex.map(lambda c: load_padded(c.path), clips))
    waves = {c.line: w for c, w in zip(clips, loaded, strict=True)}
    # Clip lengths as decoded (headers can be off by a few samples for MP3).
    clips = [Clip(c.line, c.record, c.path, waves[c.line][1]) for c in clips]
    audio_s = sum(c.seconds for c in clips)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def host_batch(b: list[Clip]) -> tuple[np.ndarray, list[int]]:
        arr = np.zeros((len(b), max(waves[c.line][0].shape[0] for c in b)), dtype=np.float32)
        for i, c in enumerate(b):
            w = waves[c.line][0]
            arr[i, : w.shape[0]] = w
        return arr, [-(-c.samples // FRAME_SAMPLES) for c in b]

    res: dict[str, Any] = {"audio_s": audio_s, "clips": len(clips), "throughput": [], "memory": []}
    # warm-up (first-call costs: cuDNN handles, kernels)
    arr, fr = host_batch(clips[:4])
    enc.encode(arr, fr)
    sync()
    passes = [(b, False) for b in a.budgets] + [(b, True) for b in a.tf32_budgets]
    for budget, tf32 in passes:
        if cuda:
            torch.backends.cudnn.allow_tf32 = tf32
            torch.backends.cudnn.deterministic = not tf32
            x0, f0 = host_batch(clips[:2])
            enc.encode(x0, f0)  # warm the algorithm choice
        batches = pack(clips, budget)
        dev_batches = []
        for b in batches:
            arr, fr = host_batch(b)
            dev_batches.append((torch.from_numpy(arr).to(device), fr))
        sync()
        # The worker's own encoder call, each batch queued before the previous one is collected.
        t0 = time.monotonic()
        pending = None
        for x, fr in dev_batches:
            nxt = enc.launch_tensor(x, fr)
            if pending is not None:
                enc.collect(pending)
            pending = nxt
        if pending is not None:
            enc.collect(pending)
        sync()
        el = time.monotonic() - t0
        padded = sum(batch_cost(b) for b in batches) / 24000
        res["throughput"].append(
            {
                "budget_s": budget,
                "tf32": tf32,
                "batches": len(batches),
                "encode_s": el,
                "audio_s_per_s": audio_s / el,
                "padded_s": padded,
            }
        )
        del dev_batches
        if cuda:
            torch.cuda.empty_cache()

    def mem_point(
        label: str, arr: np.ndarray, fr: list[int], longest_s: float, budget: float
    ) -> None:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        enc.encode(arr, fr)
        sync()
        point: dict[str, Any] = {
            "label": label,
            "budget_s": budget,
            "longest_s": longest_s,
            "batch_padded_s": arr.shape[0] * arr.shape[1] / 24000,
            "estimate_gib": need_gib(longest_s, budget, "fp32"),
        }
        if cuda:
            ctx, src = nonallocator_gib(device)
            point.update(
                max_allocated_gib=torch.cuda.max_memory_allocated() / GIB,
                max_reserved_gib=torch.cuda.max_memory_reserved() / GIB,
                context_gib=ctx,
                context_source=src,
            )
        res["memory"].append(point)

    if cuda:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.deterministic = True
    longest = max(c.seconds for c in clips)
    for budget in a.mem_budgets:
        batches = pack(clips, budget)
        worst = max(batches, key=batch_cost)
        arr, fr = host_batch(worst)
        mem_point(f"costliest batch at {budget:g} s", arr, fr, longest, budget)
    rng = np.random.default_rng(0)
    for secs in a.long:
        n = int(secs * 24000)
        n_pad = -(-n // FRAME_SAMPLES) * FRAME_SAMPLES
        arr = np.zeros((1, n_pad), dtype=np.float32)
        arr[0, :n] = (0.1 * rng.standard_normal(n)).astype(np.float32)
        mem_point(f"one {secs:g} s clip, budget 320 s", arr, [n_pad // FRAME_SAMPLES], secs, 320.0)
    res["weights_gib"] = sum(p.numel() * p.element_size() for p in enc.model.parameters()) / GIB
    res["buffers_gib"] = sum(b.numel() * b.element_size() for b in enc.model.buffers()) / GIB
    print(json.dumps(res))


# ---------------------------------------------------------------------------------------------
# comparisons and report
# ---------------------------------------------------------------------------------------------
def _codes(path: Path) -> dict[str, np.ndarray]:
    out = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            out[r["audio"]] = np.asarray(r["audio_codes"], dtype=np.int64)
    return out


def compare(a: Path, b: Path, drop_last: bool) -> dict[str, Any]:
    """Entries equal between two outputs (same clips), optionally without each clip's last frame."""
    ca, cb = _codes(a), _codes(b)
    keys = ca.keys() & cb.keys()
    assert keys in (ca.keys(), cb.keys()), "clip sets differ (and neither holds the other)"
    same = total = clips_same = 0
    last_same = last_total = 0
    for k in sorted(keys):
        x, y = ca[k], cb[k]
        assert x.shape == y.shape, (k, x.shape, y.shape)
        body_x, body_y = (x[:-1], y[:-1]) if drop_last else (x, y)
        eq = int((body_x == body_y).sum())
        same += eq
        total += body_x.size
        clips_same += int(eq == body_x.size)
        last_same += int((x[-1] == y[-1]).sum())
        last_total += x[-1].size
    return {
        "entries": total,
        "identical": same,
        "identical_pct": 100.0 * same / total if total else 100.0,
        "clips": len(keys),
        "clips_identical": clips_same,
        "last_frame_identical_pct": 100.0 * last_same / last_total if last_total else 100.0,
    }


def estimate_rows(results: dict[str, Any], factor: float = 1.0) -> list[dict[str, Any]]:
    """Estimate vs measured peak (reserved + context, what NVML shows) for each memory point.

    ``factor`` scales padded seconds (gpuspool.estimate.TF32_ACT_FACTOR for a run whose
    points were measured with TF32 convolutions, as the worker's ``--tf32`` estimate does).
    """
    from gpuspool.estimate import need_gib

    rows = []
    points = list(results.get("gpuonly", {}).get("memory", []))
    for r in results.get("gpuspool", []):
        s = r.get("summary", {})
        if s.get("peak_gpu_reserved_gib") is not None and not r.get("tf32") and not r.get("strict"):
            points.append(
                {
                    "label": f"gpuspool run, --batch-seconds {r['budget_s']:g}",
                    "budget_s": r["budget_s"],
                    "longest_s": r["longest_s"],
                    "batch_padded_s": s.get("max_batch_padded_s"),
                    "max_allocated_gib": s["peak_gpu_gib"] - s["gpu_context_gib"],
                    "max_reserved_gib": s["peak_gpu_reserved_gib"] - s["gpu_context_gib"],
                    "context_gib": s["gpu_context_gib"],
                }
            )
    for p in points:
        if "max_reserved_gib" not in p:
            continue
        est = need_gib(p["longest_s"] * factor, p["budget_s"] * factor, "fp32")
        measured = p["max_reserved_gib"] + p["context_gib"]
        rows.append(
            {
                "label": p["label"],
                "budget_s": p["budget_s"],
                "longest_s": p["longest_s"],
                "batch_padded_s": p.get("batch_padded_s"),
                "peak_allocated_plus_context_gib": p["max_allocated_gib"] + p["context_gib"],
                "peak_reserved_plus_context_gib": measured,
                "estimate_gib": est,
                "error_pct": 100.0 * (est - measured) / measured,
            }
        )
    return rows


def report(res: dict[str, Any]) -> str:
    """Human-readable report of a results dict."""
    L: list[str] = []
    e = res["env"]
    L.append(
        f"device: {e.get('gpu')}  torch {e.get('torch')}  transformers {e.get('transformers')}"
        f"  qwen-tts {e.get('qwen_tts')}  cpus {e.get('cpus')}"
    )
    d = res["dataset"]
    L.append(
        f"data: {d['clips']} clips, {d['audio_s']:.0f} s = {d['audio_s'] / 3600:.2f} h, "
        f"{d['min_s']:.1f}-{d['max_s']:.1f} s, rates {d['rates']}, formats {d['formats']}, "
        f"stereo {d['stereo']}"
    )
    L.append(f"tokenizer: {res['tokenizer']['kind']}, {res['tokenizer']['bytes'] / 1e6:.1f} MB")
    L.append("")
    L.append(
        "throughput (audio seconds per second); steady = from reading the input to the output"
        " written (model load and imports excluded); end-to-end = whole process"
    )
    L.append(
        f"{'run':44s} {'steady':>9s} {'end-to-end':>11s} {'peak alloc+ctx':>15s}"
        f" {'peak reserved+ctx':>18s}"
    )
    o = res["official"]
    audio = d["audio_s"]

    def g(x: Any) -> str:
        return f"{x:.2f} GiB" if isinstance(x, float) else "n/a"

    L.append(
        f"{'official (32/batch, file order)':44s} {audio / o['processing_s']:9.0f}"
        f" {audio / o['wall_s']:11.0f} {g(o.get('peak_gpu_gib')):>15s}"
        f" {g(o.get('peak_gpu_reserved_gib')):>18s}"
    )
    for r in res["gpuspool"]:
        s = r["summary"]
        name = f"gpuspool --batch-seconds {r['budget_s']:g}" + (" --tf32" if r["tf32"] else "")
        L.append(
            f"{name:44s} {r['steady_rate']:9.0f} {audio / r['wall_s']:11.0f}"
            f" {g(s.get('peak_gpu_gib')):>15s} {g(s.get('peak_gpu_reserved_gib')):>18s}"
        )
    L.append("")
    go = res["gpuonly"]
    L.append("GPU-only limit (encoder alone, inputs pre-loaded on the device):")
    for t in go["throughput"]:
        L.append(
            f"  budget {t['budget_s']:6g} s{' TF32' if t['tf32'] else '     '}:"
            f" {t['audio_s_per_s']:8.0f} audio s/s "
            f"({t['batches']} batches, padding {100 * (t['padded_s'] / go['audio_s'] - 1):.1f} %)"
        )
    ov = res.get("official_variants", {})
    if ov:
        L.append(
            f"official variants on the first {ov['lines']} lines: shuffled order (TF32)"
            f" {ov['rev']:.1f} s, TF32 off {ov['fp32']:.1f} s"
        )
    L.append("")
    L.append("commands:")
    for r in res["gpuspool"]:
        L.append(f"  {r['command']}")
    L.append("")
    L.append("summary:")
    for k, v in res["summary"].items():
        L.append(f"  {k}: {v}")
    L.append("")
    L.append("code agreement:")
    for c in res["agreement"]:
        L.append(
            f"  {c['what']}: {c['identical_pct']:.4f} % of {c['entries']} entries"
            f" ({c['clips_identical']}/{c['clips']} clips identical;"
            f" last frames {c['last_frame_identical_pct']:.2f} %)"
        )
    L.append("")
    L.append(
        "estimate (gpuspool.estimate.need_gib) vs measured peak (torch max reserved + non-torch"
        " context, i.e. what NVML shows):"
    )
    L.append(
        f"  {'point':42s} {'padded s':>9s} {'alloc+ctx':>10s} {'reserved+ctx':>13s}"
        f" {'estimate':>9s} {'error':>7s}"
    )
    for r in estimate_rows(res):
        L.append(
            f"  {r['label']:42s} {r['batch_padded_s'] or 0:9.0f}"
            f" {r['peak_allocated_plus_context_gib']:10.2f}"
            f" {r['peak_reserved_plus_context_gib']:13.2f} {r['estimate_gib']:9.2f}"
            f" {r['error_pct']:+6.1f}%"
        )
    return "\n".join(L)


# ---------------------------------------------------------------------------------------------
# orchestration
# ---------------------------------------------------------------------------------------------
def full_tokenizer(work: Path, config_dir: str | None, given: str | None = None) -> Path:
    """The tokenizer a bench runs: ``given``, else the full-size random-weight one built from
    the released ``config_dir`` under ``work`` (once: a later run reuses it)."""
    if given:
        return Path(given)
    tok = work / "tokenizer"
    if not (tok / "config.json").exists():
        from gpuspool.extract.tiny import build_full_tokenizer

        build_full_tokenizer(tok, config_dir)
    return tok


def _dataset(work: Path, hours: float, workers: int) -> tuple[Path, dict[str, Any]]:
    import soundfile as sf

    from gpuspool.extract.synth import synth_dataset

    rng = np.random.default_rng(2026)
    lengths: list[float] = []
    while sum(lengths) < hours * 3600:
        lengths.append(float(rng.uniform(1.0, 30.0)))
    jl = synth_dataset(work / "data", 0, seed=2026, lengths_s=lengths, workers=workers)
    rates: dict[int, int] = {}
    fmts: dict[str, int] = {}
    stereo = 0
    for line in jl.read_text().splitlines():
        p = work / "data" / json.loads(line)["audio"]
        info = sf.info(str(p))
        rates[info.samplerate] = rates.get(info.samplerate, 0) + 1
        fmts[p.suffix] = fmts.get(p.suffix, 0) + 1
        stereo += info.channels == 2
    meta = {
        "clips": len(lengths),
        "audio_s": sum(lengths),
        "min_s": min(lengths),
        "max_s": max(lengths),
        "rates": rates,
        "formats": fmts,
        "stereo": stereo,
    }
    return jl, meta


def cmd_all(a: argparse.Namespace) -> None:
    """Everything, in one process tree; prints the report and writes JSON/TXT to --out."""
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"argv": sys.argv[1:], "env": {}}
    env = res["env"]
    env["python"] = platform.python_version()
    env["cpus"] = os.cpu_count()
    import torch
    import transformers

    env["torch"] = torch.__version__
    env["transformers"] = transformers.__version__
    try:
        from importlib.metadata import version

        env["qwen_tts"] = version("qwen-tts")
    except Exception:
        env["qwen_tts"] = "?"
    env["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    t = time.monotonic()
    from gpuspool.extract.tiny import build_full_tokenizer, build_tiny_tokenizer

    tok_dir = work / "tokenizer"
    if a.config_dir:
        build_full_tokenizer(tok_dir, a.config_dir)
    else:
        build_tiny_tokenizer(tok_dir)
    res["tokenizer"] = {
        "kind": "full-size random weights" if a.config_dir else "tiny random weights",
        "bytes": sum(f.stat().st_size for f in tok_dir.iterdir()),
        "build_s": time.monotonic() - t,
    }
    print(f"[bench] tokenizer built in {res['tokenizer']['build_s']:.1f} s", flush=True)
    t = time.monotonic()
    jl, meta = _dataset(work, a.hours, os.cpu_count() or 4)
    meta["synth_s"] = time.monotonic() - t
    res["dataset"] = meta
    print(f"[bench] data: {meta}", flush=True)
    py = sys.executable
    here = str(Path(__file__).resolve())
    # Import the stack once untimed, so that no timed run pays for compiling bytecode or a
    # cold page cache that the runs after it do not.
    _step("import warm-up", [py, "-c", "from qwen_tts import Qwen3TTSTokenizer"])

    # 1. official
    off_out = work / "official.jsonl"
    official = [py, here, "official", "--input", str(jl), "--output", str(off_out),
                "--tokenizer", str(tok_dir), "--device", a.device]  # fmt: skip
    stdout, wall = _step("official run", official, cwd=jl.parent)
    res["official"] = _last_json(stdout) | {"wall_s": wall}
    print(f"[bench] official: {res['official']}", flush=True)

    # 1b. official variants on a subset (one process)
    variants = [*official, "--variants", "--limit", str(a.subset)]
    stdout, _ = _step("official variants", variants, cwd=jl.parent)
    res["official_variants"] = _last_json(stdout) | {"lines": a.subset}

    # 2. gpuspool
    res["gpuspool"] = []
    runs = [(b, False) for b in a.budgets] + [(b, True) for b in a.tf32_budgets]
    from gpuspool.extract.headers import scan_input

    longest = scan_input(jl).longest_s
    for budget, tf32 in runs:
        out = work / f"gpuspool_{budget:g}{'_tf32' if tf32 else ''}.jsonl"
        cmd = worker_command(jl, tok_dir, out, budget, a.device, tf32=tf32)
        stdout, wall = _step("gpuspool run", cmd)
        s = _last_json(stdout, "summary")
        steady = s["audio_s_done"] / (s["scan_s"] + s["processing_s"])
        r = {
            "budget_s": budget,
            "tf32": tf32,
            "wall_s": wall,
            "summary": s,
            "steady_rate": steady,
            "longest_s": longest,
            "output": str(out),
            "command": " ".join(["gpuspool extract", *cmd[3:]]),
        }
        res["gpuspool"].append(r)
        print(
            f"[bench] gpuspool {budget} tf32={tf32}: steady {steady:.0f}x, wall {wall:.1f}s,"
            f" peak {s.get('peak_gpu_gib')}",
            flush=True,
        )

    # 3. GPU-only limit and memory points
    stdout, _ = _step(
        "gpuonly",
        [
            py,
            here,
            "gpuonly",
            "--input",
            str(jl),
            "--tokenizer",
            str(tok_dir),
            "--device",
            a.device,
            "--budgets",
            *map(str, a.gpu_budgets),
            "--tf32-budgets",
            *map(str, a.gpu_tf32_budgets),
            "--mem-budgets",
            *map(str, a.mem_budgets),
            "--long",
            *map(str, a.long),
        ],
    )
    res["gpuonly"] = _last_json(stdout)

    # 4. agreement
    agreement = []
    plain = [r for r in res["gpuspool"] if not r["tf32"]]
    tf32_runs = [r for r in res["gpuspool"] if r["tf32"]]
    fp32_off = Path(f"{off_out}.fp32")
    rev_off = Path(f"{off_out}.rev")

    def add(what: str, x: Path, y: Path, drop_last: bool) -> None:
        c = compare(x, y, drop_last)
        c["what"] = what
        agreement.append(c)

    for r in plain:
        add(
            f"gpuspool {r['budget_s']:g} vs official with TF32 off (first {a.subset} lines),"
            " last frames excluded",
            Path(r["output"]),
            fp32_off,
            True,
        )
    for r in plain + tf32_runs:
        add(
            f"gpuspool {r['budget_s']:g}{' --tf32' if r['tf32'] else ''} vs official (TF32 on,"
            " PyTorch default), last frames excluded",
            Path(r["output"]),
            off_out,
            True,
        )
    add(
        f"official vs official in shuffled line order, both TF32 on (first {a.subset} lines),"
        " last frames excluded",
        off_out,
        rev_off,
        True,
    )
    add(
        f"official TF32 on vs TF32 off (first {a.subset} lines), last frames excluded",
        off_out,
        fp32_off,
        True,
    )
    for r in plain[1:]:
        add(
            f"gpuspool {plain[0]['budget_s']:g} vs {r['budget_s']:g}, all frames",
            Path(plain[0]["output"]),
            Path(r["output"]),
            False,
        )
    res["agreement"] = agreement

    # 5. summary against the targets
    off_rate = meta["audio_s"] / res["official"]["processing_s"]
    off_e2e = meta["audio_s"] / res["official"]["wall_s"]
    best_gpu = max(t["audio_s_per_s"] for t in res["gpuonly"]["throughput"] if not t["tf32"])
    best_gpu_tf32 = max(
        (t["audio_s_per_s"] for t in res["gpuonly"]["throughput"] if t["tf32"]), default=None
    )
    best = max(plain, key=lambda r: r["steady_rate"])
    default = next((r for r in plain if r["budget_s"] == 320), plain[0])
    summ = {
        "official_steady_audio_s_per_s": round(off_rate, 1),
        "official_end_to_end_audio_s_per_s": round(off_e2e, 1),
        "gpu_only_best_audio_s_per_s": round(best_gpu, 1),
        "gpu_only_best_tf32_audio_s_per_s": best_gpu_tf32 and round(best_gpu_tf32, 1),
    }
    for r in (default, best, *tf32_runs):
        tag = f"gpuspool_{r['budget_s']:g}" + ("_tf32" if r["tf32"] else "")
        summ[f"{tag}_steady_audio_s_per_s"] = round(r["steady_rate"], 1)
        summ[f"{tag}_end_to_end_audio_s_per_s"] = round(meta["audio_s"] / r["wall_s"], 1)
        summ[f"{tag}_speedup_steady_x"] = round(r["steady_rate"] / off_rate, 2)
        summ[f"{tag}_speedup_end_to_end_x"] = round(
            off_e2e and (meta["audio_s"] / r["wall_s"]) / off_e2e, 2
        )
        limit = best_gpu_tf32 if r["tf32"] and best_gpu_tf32 else best_gpu
        summ[f"{tag}_pct_of_gpu_only"] = round(100 * r["steady_rate"] / limit, 1)
        same = [
            t["audio_s_per_s"]
            for t in res["gpuonly"]["throughput"]
            if t["tf32"] == r["tf32"] and t["budget_s"] == r["budget_s"]
        ]
        if same:
            summ[f"{tag}_pct_of_gpu_only_same_budget"] = round(100 * r["steady_rate"] / same[0], 1)
        summ[f"{tag}_import_s"] = r["summary"].get("import_s")
        summ[f"{tag}_model_load_s"] = r["summary"].get("model_load_s")
        summ[f"{tag}_peak_gpu_gib"] = r["summary"].get("peak_gpu_gib")
        summ[f"{tag}_need_gib"] = r["summary"].get("need_gib")
    res["summary"] = summ
    text = report(res)
    print(text, flush=True)
    (out_dir / "extract_bench.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    (out_dir / "extract_bench.txt").write_text(text + "\n")


def cmd_table(a: argparse.Namespace) -> None:
    """Recompute the estimate table from a results JSON with the current constants."""
    from gpuspool.estimate import TF32_ACT_FACTOR

    res = json.loads(Path(a.results).read_text())
    rows = estimate_rows(res, TF32_ACT_FACTOR if a.tf32 else 1.0)
    for r in rows:
        print(
            f"{r['label']:42s} measured {r['peak_reserved_plus_context_gib']:7.2f} GiB"
            f"  estimate {r['estimate_gib']:7.2f} GiB  error {r['error_pct']:+6.1f}%"
        )
    worst = max(abs(r["error_pct"]) for r in rows) if rows else 0.0
    print(f"worst |error|: {worst:.1f}%")


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("all")
    s.add_argument("--work", required=True, help="scratch folder (tokenizer, data, outputs)")
    s.add_argument("--out", default=str(HERE / "results"))
    s.add_argument("--config-dir", help="released config folder: build the full-size tokenizer")
    s.add_argument("--hours", type=float, default=2.05)
    s.add_argument("--device", default="cuda:0")
    s.add_argument("--budgets", type=float, nargs="+", default=[320.0, 1280.0])
    s.add_argument("--tf32-budgets", type=float, nargs="*", default=[1280.0])
    s.add_argument("--gpu-budgets", type=float, nargs="+", default=[320.0, 640.0, 1280.0])
    s.add_argument("--gpu-tf32-budgets", type=float, nargs="*", default=[640.0, 1280.0])
    s.add_argument("--subset", type=int, default=160, help="lines for the official variants")
    s.add_argument(
        "--mem-budgets", type=float, nargs="+", default=[160.0, 320.0, 640.0, 1280.0, 1920.0]
    )
    s.add_argument("--long", type=float, nargs="+", default=[600.0, 1200.0])
    s = sub.add_parser("official")
    s.add_argument("--input", required=True)
    s.add_argument("--output", required=True)
    s.add_argument("--tokenizer", required=True)
    s.add_argument("--device", default="cuda:0")
    s.add_argument("--variants", action="store_true", help="subset variants (see docstring)")
    s.add_argument("--limit", type=int, default=160)
    s = sub.add_parser("gpuonly")
    s.add_argument("--input", required=True)
    s.add_argument("--tokenizer", required=True)
    s.add_argument("--device", default="cuda:0")
    s.add_argument("--budgets", type=float, nargs="+", required=True)
    s.add_argument("--tf32-budgets", type=float, nargs="*", default=[])
    s.add_argument("--mem-budgets", type=float, nargs="+", required=True)
    s.add_argument("--long", type=float, nargs="+", default=[])
    s = sub.add_parser("table")
    s.add_argument("results")
    s.add_argument("--tf32", action="store_true", help="points measured with TF32 convolutions")
    a = ap.parse_args(argv)
    {"all": cmd_all, "official": cmd_official, "gpuonly": cmd_gpuonly, "table": cmd_table}[a.cmd](a)


if __name__ == "__main__":
    main()
