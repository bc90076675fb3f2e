"""Batches cut at a padded-seconds budget (torch-free).

Encoder memory grows with batch size × longest padded clip in the batch, so a batch's cost is
``len(batch) × longest`` in padded samples. A window of lines is sorted by length (longest
first) and cut greedily so each batch costs at most the budget; a clip longer than the budget
runs alone. Batches are then ordered by their first line, so output in input order can be
written early.

Each batch's length can be rounded up to a whole number of *shape buckets*, so that batch shapes
repeat: the GPU libraries set each new shape up on the host, which costs more than the encoding
of a small batch. Right padding beyond the clip's own frames is outside their receptive field
(the encoder is causal; only the rounding of a differently shaped batch could differ, and on
the sets measured no code did), and the rounded length is what the budget counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from gpuspool.extract.headers import FRAME_SAMPLES, MODEL_SAMPLE_RATE, Clip


def budget_samples(budget_s: float) -> int:
    """Padded-seconds budget in samples at 24 kHz."""
    if not math.isfinite(budget_s) or budget_s <= 0:
        raise ValueError("batch budget must be a number > 0 seconds")
    return int(budget_s * MODEL_SAMPLE_RATE)


def bucket_samples(bucket_s: float) -> int:
    """A shape bucket of ``bucket_s`` seconds in samples: whole frames (under half a frame: 0,
    none)."""
    if not math.isfinite(bucket_s) or bucket_s < 0:
        raise ValueError("shape bucket must be a number ≥ 0 seconds")
    return round(bucket_s * MODEL_SAMPLE_RATE / FRAME_SAMPLES) * FRAME_SAMPLES


#: Rounding up adds at most this share of a batch's length (the bucket shrinks for short ones).
MAX_ROUNDING = 1 / 8


def batch_length(longest: int, bucket: int, budget: int) -> int:
    """The padded length of a batch whose longest clip has ``longest`` samples (whole frames):
    rounded up to a multiple of ``bucket`` samples, or of an eighth of ``longest`` (whole
    frames) where that is less, so that short clips are not padded to twice their length; never
    past the budget for a clip that fits it, nor at all for one that does not (it runs alone,
    at its own length)."""
    step = min(bucket, int(longest * MAX_ROUNDING) // FRAME_SAMPLES * FRAME_SAMPLES)
    if step <= FRAME_SAMPLES or longest >= budget:
        return longest
    return min(-(-longest // step) * step, budget // FRAME_SAMPLES * FRAME_SAMPLES)


def batch_cost(clips: Sequence[Clip], bucket: int = 0, budget: int = 0) -> int:
    """Padded samples a batch occupies: size × its padded length."""
    if not clips:
        return 0
    return len(clips) * batch_length(max(c.padded for c in clips), bucket, budget)


def pack(clips: Sequence[Clip], budget_s: float, bucket_s: float = 0.0) -> list[list[Clip]]:
    """Cut ``clips`` into batches of padded cost ≤ budget (a longer clip alone), each batch's
    length rounded up to ``bucket_s`` seconds (:func:`batch_length`)."""
    return [batch for batch, _ in cut(clips, budget_s, bucket_s)]


def cut(
    clips: Sequence[Clip], budget_s: float, bucket_s: float = 0.0
) -> list[tuple[list[Clip], int]]:
    """:func:`pack`'s batches, each with the padded length (samples) it was cut for."""
    budget = budget_samples(budget_s)
    bucket = bucket_samples(bucket_s)
    ordered = sorted(clips, key=lambda c: (-c.padded, c.line))
    batches: list[tuple[list[Clip], int]] = []
    cur: list[Clip] = []
    cur_max = 0
    for c in ordered:
        if cur and (len(cur) + 1) * cur_max > budget:
            batches.append((cur, cur_max))
            cur = []
        if not cur:
            cur_max = batch_length(c.padded, bucket, budget)
        cur.append(c)
    if cur:
        batches.append((cur, cur_max))
    for b, _ in batches:
        b.sort(key=lambda c: c.line)
    batches.sort(key=lambda bl: bl[0][0].line)
    return batches
