"""The worker's encoder on a real GPU: codes as the official call gives them, and no device waits.

``CodeEncoder`` keeps the convolutions' shape buffers on the host and asks for the 16 kept
codebooks; on the CPU (CI) those changes do nothing, so only a GPU can show that they leave the
codes alone and remove the synchronisations. On the GPU machine: ``pytest -m gpu tests/gpu``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("qwen_tts")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this host"),
]


@pytest.fixture(scope="module")
def fp32() -> Any:
    """Full fp32 (TF32 off), as the worker runs by default."""
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 clips of 0.4–9 s: every sample rate, mono and stereo, WAV/FLAC/MP3."""
    from gpuspool.extract.synth import synth_dataset

    return synth_dataset(tmp_path_factory.mktemp("ds"), 12, 0.4, 9.0, seed=5, stereo_fraction=0.4)


@pytest.fixture(scope="module")
def encoder(tiny_tokenizer: Path, fp32: Any) -> Any:
    from gpuspool.extract.model import CodeEncoder

    return CodeEncoder(str(tiny_tokenizer), torch.device("cuda:0"))


def _padded(seconds: list[float], seed: int = 0) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    frames = [int(np.ceil(s * 24000 / 1920)) for s in seconds]
    arr = np.zeros((len(seconds), max(frames) * 1920), dtype=np.float32)
    for i, s in enumerate(seconds):
        n = int(s * 24000)
        arr[i, :n] = 0.1 * rng.standard_normal(n)
    return arr, frames


def test_shape_buffers_stay_on_host(encoder: Any) -> None:
    ints = [
        b
        for m in encoder.model.encoder.modules()
        for b in m._buffers.values()
        if b is not None and b.dim() == 0 and not b.is_floating_point()
    ]
    assert ints, "the encoder has no 0-d integer buffers: the model changed, re-check the fix"
    assert all(b.device.type == "cpu" for b in ints)
    assert next(encoder.model.encoder.parameters()).device.type == "cuda"


def test_launch_never_waits_for_the_device(encoder: Any) -> None:
    arr, frames = _padded([3.1, 7.9, 1.2])
    encoder.collect(encoder.launch(arr, frames))  # first-call set-up may synchronise
    arr, frames = _padded([2.2, 5.3, 9.7, 0.6], seed=1)  # a new shape, as every batch brings
    torch.cuda.set_sync_debug_mode("error")
    try:
        pending = encoder.launch(arr, frames)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    codes = encoder.collect(pending)
    assert [c.shape for c in codes] == [(f, 16) for f in frames]


def test_codes_equal_official_encode_on_gpu(
    encoder: Any, tiny_tokenizer: Path, dataset: Path, fp32: Any
) -> None:
    """Every clip, alone through the official call on the GPU, against a mixed batch here."""
    from qwen_tts import Qwen3TTSTokenizer

    from gpuspool.extract.audio import load_padded

    official = Qwen3TTSTokenizer.from_pretrained(str(tiny_tokenizer), device_map="cuda:0")
    lines = [json.loads(x) for x in dataset.read_text().splitlines() if x.strip()]
    paths = [str(dataset.parent / r["audio"]) for r in lines]
    waves = [load_padded(Path(p)) for p in paths]
    arr = np.zeros((len(waves), max(w.shape[0] for w, _ in waves)), dtype=np.float32)
    for i, (w, _) in enumerate(waves):
        arr[i, : w.shape[0]] = w
    frames = [-(-n // 1920) for _, n in waves]
    got = encoder.encode(arr, frames)
    for p, g in zip(paths, got, strict=True):
        ref = official.encode([p]).audio_codes[0].cpu().numpy()
        assert ref.shape == g.shape
        np.testing.assert_array_equal(g[:-1], ref[:-1], err_msg=p)
