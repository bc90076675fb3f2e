"""GPU memory need of an extraction job, from the numbers measured on the released architecture.

Pure arithmetic, no torch: the daemon uses :func:`need_gib` at intake with the longest clip the
scanner (running as the submitter) found, the worker uses it to report its bound, and the CLI's
:func:`job_need_gib` reads the headers itself (as the user running it; never the daemon).
Activation memory of the encoder grows linearly with the padded audio in a batch (batch size ×
longest clip); the worker cuts batches at a padded-seconds budget, so the largest batch holds
``max(budget, longest clip)`` padded seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from gpuspool.models import JobSpec

Dtype = Literal["fp32", "bf16"]

#: Peak (torch reserved) per minute of padded audio in one batch (GiB), encoder, H100. fp32: the
#: worker's default full fp32 with deterministic cuDNN algorithms, fitted on 9 points from 160 to
#: 1920 padded seconds (bench/results/extract_h100.txt). bf16: earlier measurement, not refitted.
ACT_GIB_PER_MIN: dict[str, float] = {"fp32": 1.23, "bf16": 0.86}
#: ``--tf32`` (TF32 convolutions, cuDNN's heuristic algorithms) takes more activation memory:
#: 1.72 GiB per padded minute measured, 1.40 × the fp32 default.
TF32_ACT_FACTOR = 1.40
#: Encoder weights and codebooks on the GPU (GiB); the decoder is never moved to the GPU.
WEIGHTS_GIB: dict[str, float] = {"fp32": 0.21, "bf16": 0.11}
#: A CUDA context with cuDNN/cuBLAS handles loaded (GiB), NVML's per-process figure minus
#: torch's reserved memory (0.67 GiB on an H100, driver 580, torch 2.11).
CONTEXT_GIB = 0.67
#: Reserved memory beyond weights and activations (allocator segments, workspaces), GiB: the
#: intercept of the fit.
WORKSPACE_GIB = 0.44
#: Allocator slack on top of the activation peak (fraction).
MARGIN = 0.10


def need_gib(longest_clip_s: float, budget_s: float, dtype: Dtype = "fp32") -> float:
    """GPU memory (GiB) an extraction needs: weights + context + activations of the largest batch.

    ``longest_clip_s`` is the longest clip of the input (a clip longer than the budget runs
    alone, so it sets the largest batch); ``budget_s`` is the padded-seconds batch budget.
    """
    if longest_clip_s < 0 or budget_s <= 0:
        raise ValueError("longest_clip_s must be >= 0 and budget_s > 0")
    if dtype not in ACT_GIB_PER_MIN:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(ACT_GIB_PER_MIN)}")
    padded_min = max(longest_clip_s, budget_s) / 60.0
    activations = ACT_GIB_PER_MIN[dtype] * padded_min * (1.0 + MARGIN)
    return round(WEIGHTS_GIB[dtype] + CONTEXT_GIB + WORKSPACE_GIB + activations, 2)


@dataclass(frozen=True)
class JobNeed:
    """A job's memory need and what it rests on."""

    gib: float
    longest_s: float
    budget_s: float
    #: Why the estimate is partial (an audio header could not be read), or None.
    partial: str | None = None


def job_need_gib(spec: JobSpec, default_batch_seconds: float) -> JobNeed:
    """A job's need from its longest clip (audio headers) and its batch budget."""
    from gpuspool.extract.headers import scan_input  # torch-free

    budget = spec.batch_seconds or default_batch_seconds
    longest, partial = 0.0, None
    try:
        longest = scan_input(spec.input).longest_s
    except Exception as exc:
        partial = str(exc)
    return JobNeed(need_gib(longest, budget, spec.dtype), longest, budget, partial)


def job_threshold_gib(spec: JobSpec, default_min_free: float, need: float) -> float:
    """Free memory a job waits for: its own ``min_free_gib``, else the default; ``auto`` = need."""
    chosen = spec.min_free_gib if spec.min_free_gib is not None else default_min_free
    return need if chosen == "auto" else float(chosen)
