"""Decode and resample audio exactly as the official loader does, without torch.

``Qwen3TTSTokenizer.encode(paths)`` (qwen-tts 0.1.1) loads a path with
``librosa.load(path, sr=None, mono=True)`` and then ``librosa.resample(y, orig_sr=sr,
target_sr=24000)``. With librosa 0.11 that is: ``soundfile`` read as float32, transpose to
(channels, samples), mean over channels, ``soxr.resample(..., quality="soxr_hq")`` and a fix of
the length to ``ceil(n * 24000 / sr)``. This module does the same steps with the same libraries,
so the waveforms are bit-identical (a test checks it), while skipping librosa's import and its
audioread fallback. soundfile and soxr release the GIL, so threads overlap well.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import soundfile as sf
import soxr

from gpuspool.extract.headers import (
    MODEL_SAMPLE_RATE,
    BadAudio,
    _one_line,
    padded_samples,
    resampled_length,
)

Wave = npt.NDArray[np.float32]


def load_resampled(path: Path, target_sr: int = MODEL_SAMPLE_RATE) -> Wave:
    """Mono float32 waveform of ``path`` at ``target_sr``, as the official loader makes it."""
    try:
        with sf.SoundFile(str(path)) as f:
            sr = int(f.samplerate)
            y = f.read(frames=-1, dtype="float32", always_2d=False).T
    except Exception as exc:
        if not path.exists():
            raise BadAudio(f"audio file not found: {path}") from exc
        raise BadAudio(f"unreadable audio: {_one_line(exc)}") from exc
    if y.size == 0:
        raise BadAudio("empty audio (0 samples)")
    if not np.isfinite(y).all():
        raise BadAudio("audio has NaN or infinite samples")
    if y.ndim > 1:
        y = np.mean(y, axis=tuple(range(y.ndim - 1)))
    if sr != target_sr:
        n = resampled_length(y.shape[-1], sr) if target_sr == MODEL_SAMPLE_RATE else None
        if n is None:
            n = int(np.ceil(y.shape[-1] * (float(target_sr) / sr)))
        y_hat = soxr.resample(y, sr, target_sr, quality="soxr_hq")
        if y_hat.shape[-1] > n:
            y_hat = y_hat[:n]
        elif y_hat.shape[-1] < n:
            y_hat = np.pad(y_hat, (0, n - y_hat.shape[-1]), mode="constant")
        y = np.asarray(y_hat, dtype=y.dtype)
    return np.ascontiguousarray(y, dtype=np.float32)


def load_padded(path: Path) -> tuple[Wave, int]:
    """(waveform right-padded with zeros to whole frames, unpadded length) at 24 kHz."""
    y = load_resampled(path)
    n = int(y.shape[0])
    out = np.zeros(padded_samples(n), dtype=np.float32)
    out[:n] = y
    return out, n
