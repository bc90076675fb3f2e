"""Random-weight Qwen3-TTS-Tokenizer-12Hz folders that load through the real ``from_pretrained``.

``build_tiny_tokenizer`` makes the released classes with small dimensions (a few hundred KB,
fast on CPU) for tests and the demo. ``build_full_tokenizer`` makes the released architecture from
its ``config.json`` / ``preprocessor_config.json`` (about 682 MB) for GPU benchmarks: memory and
speed are real, codes are meaningless. Both keep the frame geometry (24 kHz in, 1920 samples a
frame, 16 valid codebooks), fill the zero-initialised codebooks with random values (otherwise every
code would be 0), and save with ``save_pretrained`` plus the feature extractor's config, so
``Qwen3TTSTokenizer.from_pretrained(DIR)`` loads them offline.

CLI: ``python -m gpuspool.extract.tiny DIR [--full CONFIG_DIR] [--seed N]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path
from typing import Any

PREPROCESSOR_CONFIG: dict[str, Any] = {
    "chunk_length_s": None,
    "feature_extractor_type": "EncodecFeatureExtractor",
    "feature_size": 1,
    "overlap": None,
    "padding_side": "right",
    "padding_value": 0.0,
    "return_attention_mask": True,
    "sampling_rate": 24000,
}

#: Small dimensions, same classes and frame geometry as the release.
TINY_CONFIG: dict[str, Any] = {
    "encoder_valid_num_quantizers": 16,
    "input_sample_rate": 24000,
    "output_sample_rate": 24000,
    "decode_upsample_rate": 1920,
    "encode_downsample_rate": 1920,
    "encoder_config": {
        "_frame_rate": 12.5,
        "audio_channels": 1,
        "codebook_dim": 16,
        "codebook_size": 64,
        "compress": 2,
        "dilation_growth_rate": 2,
        "dtype": "float32",
        "head_dim": 16,
        "hidden_act": "gelu",
        "hidden_size": 32,
        "intermediate_size": 64,
        "kernel_size": 7,
        "last_kernel_size": 3,
        "max_position_embeddings": 8000,
        "model_type": "mimi",
        "num_attention_heads": 2,
        "num_filters": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "num_quantizers": 32,
        "num_residual_layers": 1,
        "num_semantic_quantizers": 1,
        "pad_mode": "constant",
        "residual_kernel_size": 3,
        "sampling_rate": 24000,
        "sliding_window": 250,
        "trim_right_ratio": 1.0,
        "upsample_groups": 32,
        "upsampling_ratios": [8, 6, 5, 4],
        "use_cache": False,
        "use_causal_conv": True,
        "use_conv_shortcut": False,
        "use_streaming": False,
        "vector_quantization_hidden_dimension": 16,
    },
    "decoder_config": {
        "latent_dim": 32,
        "codebook_dim": 16,
        "codebook_size": 64,
        "decoder_dim": 32,
        "hidden_act": "silu",
        "hidden_size": 32,
        "intermediate_size": 64,
        "head_dim": 16,
        "num_attention_heads": 2,
        "num_hidden_layers": 1,
        "num_key_value_heads": 2,
        "num_quantizers": 16,
        "num_semantic_quantizers": 1,
        "semantic_codebook_size": 64,
        "sliding_window": 72,
        "upsample_rates": [8, 5, 4, 3],
        "upsampling_ratios": [2, 2],
        "vector_quantization_hidden_dimension": 16,
    },
}


def _build(config: dict[str, Any], path: str | os.PathLike[str], seed: int) -> Path:
    import torch

    from gpuspool.extract.model import import_tokenizer_stack

    config_module, model_module = import_tokenizer_stack()
    d = copy.deepcopy(config)
    d.pop("architectures", None)
    d.pop("model_type", None)
    cfg = config_module.Qwen3TTSTokenizerV2Config(**d)
    cfg.architectures = ["Qwen3TTSTokenizerV2Model"]
    torch.manual_seed(seed)
    model = model_module.Qwen3TTSTokenizerV2Model(cfg).eval()
    with torch.no_grad():
        # Mimi's codebook sums (buffers) and Qwen's decoder codebooks start at zero: fill them.
        for name, buf in model.named_buffers():
            if name.endswith("embed_sum"):
                buf.normal_()
        for name, p in model.named_parameters():
            if name.endswith("embedding_sum"):
                p.normal_()
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n")
    return out


def build_tiny_tokenizer(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Save a small random-weight tokenizer (released classes) to ``path``; return the folder."""
    return _build(TINY_CONFIG, path, seed)


def build_full_tokenizer(
    path: str | os.PathLike[str], config_dir: str | os.PathLike[str], seed: int = 0
) -> Path:
    """Save the released architecture with random weights (about 682 MB) to ``path``.

    ``config_dir`` holds the released ``config.json`` (and optionally
    ``preprocessor_config.json``, copied when present). For GPU benchmarks; never commit it.
    """
    cdir = Path(config_dir)
    config = json.loads((cdir / "config.json").read_text())
    out = _build(config, path, seed)
    pre = cdir / "preprocessor_config.json"
    if pre.exists():
        (out / "preprocessor_config.json").write_text(pre.read_text())
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m gpuspool.extract.tiny", description=__doc__)
    ap.add_argument("dir", help="folder to write the tokenizer to")
    ap.add_argument("--full", metavar="CONFIG_DIR", help="build the full-size released config")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.full:
        out = build_full_tokenizer(a.dir, a.full, a.seed)
    else:
        out = build_tiny_tokenizer(a.dir, a.seed)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(json.dumps({"dir": str(out), "bytes": size}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
