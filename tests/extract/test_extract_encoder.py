"""The encoder's host-side shortcuts leave its results as transformers computes them (CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("qwen_tts")

from gpuspool.extract.model import (  # noqa: E402
    build_causal_masks_directly,
    load_tokenizer,
    pad_inside_convolutions,
)


@pytest.fixture(scope="module")
def pair(tiny_tokenizer: Path) -> tuple[Any, Any]:
    """The tiny tokenizer twice: as transformers runs it, and with the shortcuts."""
    plain, _ = load_tokenizer(str(tiny_tokenizer), torch.float32)
    fast, _ = load_tokenizer(str(tiny_tokenizer), torch.float32)
    from transformers.models.mimi.modeling_mimi import MimiConv1d

    convs = [m for m in fast.encoder.modules() if isinstance(m, MimiConv1d)]
    assert pad_inside_convolutions(fast.encoder) == sum(m.pad_mode == "constant" for m in convs)
    assert len(convs) > 10
    build_causal_masks_directly(fast.encoder.encoder_transformer)
    return plain, fast


def test_the_direct_mask_is_the_one_transformers_builds(pair: tuple[Any, Any]) -> None:
    from transformers.models.mimi import modeling_mimi

    plain, fast = pair
    seen: list[Any] = []
    make = modeling_mimi.create_causal_mask

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(make(*args, **kwargs))
        return seen[-1]

    modeling_mimi.create_causal_mask = spy
    try:
        for b, n in ((1, 1), (3, 7), (2, 250), (5, 301)):
            x = torch.randn(b, n, plain.config.encoder_config.hidden_size)
            with torch.inference_mode():
                got = fast.encoder.encoder_transformer(x).last_hidden_state
                want = plain.encoder.encoder_transformer(x).last_hidden_state
            direct, built = seen[-2], seen[-1]
            assert built.shape == direct.shape == (b, 1, n, n)
            assert direct.dtype == built.dtype and direct.stride() == built.stride()
            assert torch.equal(direct, built)
            assert torch.equal(got, want)
    finally:
        modeling_mimi.create_causal_mask = make


def test_a_call_with_a_mask_of_its_own_gets_transformers_mask(pair: tuple[Any, Any]) -> None:
    _, fast = pair
    x = torch.randn(2, 9, fast.config.encoder_config.hidden_size)
    keep = torch.ones(2, 9, dtype=torch.long)
    keep[1, 6:] = 0
    with torch.inference_mode():
        a = fast.encoder.encoder_transformer(x, attention_mask=keep).last_hidden_state
        b = fast.encoder.encoder_transformer(x).last_hidden_state
    assert torch.equal(a[0], b[0])
    assert not torch.equal(a[1], b[1])  # the padding mask was applied, not the plain one


@pytest.mark.parametrize("samples", [1920 * 37, 1920 * 3, 1920 * 3 + 17, 999])
def test_codes_with_the_shortcuts_equal_transformers(pair: tuple[Any, Any], samples: int) -> None:
    """Whole frames (what the worker sends) and odd lengths (the original padding runs)."""
    plain, fast = pair
    x = 0.1 * torch.randn(3, 1, samples, generator=torch.Generator().manual_seed(samples))
    with torch.inference_mode():
        want = plain.encoder.encode(x, num_quantizers=16).audio_codes
        got = fast.encoder.encode(x, num_quantizers=16).audio_codes
        emb_want = plain.encoder.encoder(x)
        emb_got = fast.encoder.encoder(x)
    assert torch.equal(got, want)
    # Padding inside the convolution may round differently on another kernel, never by more.
    assert np.allclose(emb_got.numpy(), emb_want.numpy(), rtol=0, atol=1e-5)


def test_eager_attention_keeps_transformers_mask(tiny_tokenizer: Path, tmp_path: Path) -> None:
    """The eager implementation adds the mask to the scores: a boolean triangle would block
    nothing. A tokenizer whose config asks for it keeps transformers' mask, even while the
    plain-call flag is on (another model's call in the same thread)."""
    import json
    import shutil

    from gpuspool.extract import model as m

    eager_dir = tmp_path / "eager"
    shutil.copytree(tiny_tokenizer, eager_dir)
    cfg = json.loads((eager_dir / "config.json").read_text())
    cfg["encoder_config"]["attn_implementation"] = "eager"
    (eager_dir / "config.json").write_text(json.dumps(cfg))
    plain, _ = load_tokenizer(str(eager_dir), torch.float32)
    fast, _ = load_tokenizer(str(eager_dir), torch.float32)
    transformer = fast.encoder.encoder_transformer
    assert transformer.config._attn_implementation == "eager"
    assert not build_causal_masks_directly(transformer)
    x = torch.randn(2, 40, transformer.config.hidden_size)
    m._plain_causal.on = True
    try:
        with torch.inference_mode():
            got = transformer(x).last_hidden_state
    finally:
        m._plain_causal.on = False
    with torch.inference_mode():
        want = plain.encoder.encoder_transformer(x).last_hidden_state
        cut = transformer(x[:, :20]).last_hidden_state
    assert torch.equal(got, want)
    assert torch.allclose(cut, want[:, :20], atol=1e-6)  # causal: later frames change nothing


def test_a_copied_encoder_runs_its_own_weights(pair: tuple[Any, Any]) -> None:
    import copy

    _, fast = pair
    clone = copy.deepcopy(fast.encoder)
    for p in clone.encoder.parameters():
        p.data.zero_()
    x = 0.1 * torch.randn(1, 1, 1920 * 4, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.count_nonzero(clone.encoder(x)) == 0
        assert torch.count_nonzero(fast.encoder.encoder(x)) > 0
