"""Synthetic speech-like datasets for tests, the demo and the benchmark (numpy + soundfile only).

Clips have mixed sample rates, mono and stereo, and mixed formats (WAV, FLAC, and MP3 where
libsndfile can write it). The JSONL lists relative audio paths (resolved against its folder) and
a ``text`` field, like the official fine-tuning input. The content is a few harmonics with
vibrato and amplitude modulation plus noise: codes from a random-weight model are meaningless,
but lengths, rates, channels and codecs exercise the real loading path.

CLI: ``python -m gpuspool.extract.synth OUT_DIR --clips N [--min-s 1 --max-s 30 --seed 0]``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf

SAMPLE_RATES: tuple[int, ...] = (16000, 22050, 24000, 44100, 48000)

#: (extension, soundfile format, subtype)
_FORMATS: dict[str, tuple[str, str, str]] = {
    "wav": ("wav", "WAV", "PCM_16"),
    "wav_float": ("wav", "WAV", "FLOAT"),
    "flac": ("flac", "FLAC", "PCM_16"),
    "mp3": ("mp3", "MP3", "MPEG_LAYER_III"),
}


def mp3_supported() -> bool:
    """Whether this libsndfile can write (and so read) MP3."""
    return "MP3" in sf.available_formats() and sf.check_format("MP3", "MPEG_LAYER_III")


def default_formats() -> tuple[str, ...]:
    """WAV (16-bit and float), FLAC, and MP3 when supported."""
    base = ("wav", "wav_float", "flac")
    return (*base, "mp3") if mp3_supported() else base


def speechlike(seconds: float, sr: int, channels: int, seed: int) -> np.ndarray:
    """A float32 (samples,) or (samples, channels) signal in [-1, 1]."""
    rng = np.random.default_rng(seed)
    n = max(1, round(seconds * sr))
    t = np.arange(n, dtype=np.float64) / sr
    f0 = rng.uniform(90.0, 260.0)
    vib = 1.0 + 0.03 * np.sin(2 * np.pi * rng.uniform(3.0, 6.0) * t)
    phase = 2 * np.pi * f0 * np.cumsum(vib) / sr
    x = np.zeros(n)
    for k in range(1, 6):
        x += (0.4 / k) * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
    x *= 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2.0, 5.0) * t) ** 2
    x += 0.01 * rng.standard_normal(n)
    x = 0.3 * x / max(1e-6, float(np.max(np.abs(x))))
    if channels == 1:
        return x.astype(np.float32)
    other = 0.8 * x + 0.005 * rng.standard_normal(n)
    return np.stack([x, other], axis=1).astype(np.float32)


def _write_clip(job: tuple[str, float, int, int, str, int]) -> None:
    path, seconds, sr, channels, fmt, seed = job
    _, sf_format, subtype = _FORMATS[fmt]
    sf.write(path, speechlike(seconds, sr, channels, seed), sr, format=sf_format, subtype=subtype)


def synth_dataset(
    out_dir: str | os.PathLike[str],
    n_clips: int,
    min_s: float = 1.0,
    max_s: float = 30.0,
    seed: int = 0,
    *,
    formats: Sequence[str] | None = None,
    sample_rates: Sequence[int] = SAMPLE_RATES,
    stereo_fraction: float = 0.3,
    lengths_s: Sequence[float] | None = None,
    jsonl_name: str = "input.jsonl",
    workers: int = 1,
) -> Path:
    """Write ``n_clips`` clips under ``out_dir/audio/`` and the input JSONL; return its path.

    Lengths are uniform in [min_s, max_s] unless ``lengths_s`` gives them (then ``n_clips`` is
    ignored). Sample rate, channels and format cycle deterministically with the seed.
    """
    out = Path(out_dir)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    fmts = tuple(formats) if formats is not None else default_formats()
    for f in fmts:
        if f not in _FORMATS:
            raise ValueError(f"unknown format {f!r}; expected one of {sorted(_FORMATS)}")
    rng = np.random.default_rng(seed)
    lengths = (
        [float(x) for x in lengths_s]
        if lengths_s is not None
        else [float(x) for x in rng.uniform(min_s, max_s, size=n_clips)]
    )
    jobs: list[tuple[str, float, int, int, str, int]] = []
    lines: list[str] = []
    for i, secs in enumerate(lengths):
        sr = int(sample_rates[int(rng.integers(len(sample_rates)))])
        fmt = fmts[i % len(fmts)]
        channels = 2 if rng.random() < stereo_fraction else 1
        rel = f"audio/clip{i:05d}_{sr}_{channels}ch.{_FORMATS[fmt][0]}"
        jobs.append((str(out / rel), secs, sr, channels, fmt, seed * 1_000_003 + i))
        lines.append(json.dumps({"audio": rel, "text": f"synthetic clip {i}, {secs:.2f} s"}))
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as ex:
            list(ex.map(_write_clip, jobs, chunksize=4))
    else:
        for j in jobs:
            _write_clip(j)
    jsonl = out / jsonl_name
    jsonl.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return jsonl


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m gpuspool.extract.synth", description=__doc__)
    ap.add_argument("out_dir")
    ap.add_argument("--clips", type=int, default=100)
    ap.add_argument("--min-s", type=float, default=1.0)
    ap.add_argument("--max-s", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args(argv)
    p = synth_dataset(a.out_dir, a.clips, a.min_s, a.max_s, a.seed, workers=a.workers)
    print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
