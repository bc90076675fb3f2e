"""Batches cut at a padded-seconds budget (torch-free).

Encoder memory grows with batch size × longest padded clip in the batch, so a batch's cost is
``len(batch) × longest`` in padded samples. A window of lines is sorted by length (longest
first) and cut greedily so each batch costs at most the budget; a clip longer than the budget
runs alone. Batches are then ordered by their first line, so output in input order can be
written early.
"""

from __future__ import annotations

from collections.abc import Sequence

from gpuspool.extract.headers import MODEL_SAMPLE_RATE, Clip


def budget_samples(budget_s: float) -> int:
    """Padded-seconds budget in samples at 24 kHz."""
    if budget_s <= 0:
        raise ValueError("batch budget must be > 0 seconds")
    return int(budget_s * MODEL_SAMPLE_RATE)


def batch_cost(clips: Sequence[Clip]) -> int:
    """Padded samples a batch occupies: size × longest padded clip."""
    return len(clips) * max(c.padded for c in clips) if clips else 0


def pack(clips: Sequence[Clip], budget_s: float) -> list[list[Clip]]:
    """Cut ``clips`` into batches of padded cost ≤ budget (a longer clip alone)."""
    budget = budget_samples(budget_s)
    ordered = sorted(clips, key=lambda c: (-c.padded, c.line))
    batches: list[list[Clip]] = []
    cur: list[Clip] = []
    cur_max = 0
    for c in ordered:
        if cur and (len(cur) + 1) * cur_max > budget:
            batches.append(cur)
            cur = []
        if not cur:
            cur_max = c.padded
        cur.append(c)
    if cur:
        batches.append(cur)
    for b in batches:
        b.sort(key=lambda c: c.line)
    batches.sort(key=lambda b: b[0].line)
    return batches
