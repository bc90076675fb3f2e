"""Qwen3-TTS audio-code extraction: the job the daemon runs (``gpuspool extract``).

This package's own import pulls in nothing heavy: the daemon imports the torch-free submodules
(:mod:`.headers` for ``scan_input`` and ``clip_seconds``, :mod:`.synth`, :mod:`.plan`) directly.
Only :mod:`.model` (and what the worker imports while running) needs torch and qwen-tts, from
the ``extract`` extra.
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run ``gpuspool extract`` with ``argv``; see :func:`gpuspool.extract.cli.main`."""
    from gpuspool.extract.cli import main as _main

    return _main(argv)
