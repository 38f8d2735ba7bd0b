"""Optimal bit allocation under the additive damage model: a multiple-choice knapsack, solved by DP.

This is what one-shot mixed-precision allocators do: assume each linear's damage is independent of
the others, then minimise the summed damage subject to the bits budget. Every gene picks exactly
one width; its weight is the extra bits it costs over its lowest width. Weights are integers in a
common unit (the greatest common divisor of all extra weight-bits, so the DP is exact) unless that
needs more than `max_units` units for the largest budget; then the unit is coarsened and weights
are rounded up, which keeps every allocation within its budget. One DP table serves every budget.
"""

from __future__ import annotations

import logging
import math
from functools import reduce
from typing import Sequence

import numpy as np

from amq.search.space import SearchSpace

log = logging.getLogger(__name__)


def _integer_weights(space: SearchSpace, max_excess: float, max_units: int) -> tuple[np.ndarray, float]:
    """Per-choice extra weight-bits in integer units, and the unit in average bits."""
    bits = space.choice_bits
    extra = np.rint(space.gene_numel[:, None] * (bits - bits[:, :1])).astype(np.int64)  # weight-bits over the lowest width
    total = float(space.gene_numel.sum() / space.gene_share.sum())  # all counted weights, pinned ones included
    g = reduce(math.gcd, (int(x) for x in np.unique(extra) if x > 0), 0) or 1
    if max_excess * total / g <= max_units:
        return extra // g, g / total
    unit = max_excess / max_units
    log.info("knapsack: %d units would exceed max_units; weights rounded up to %.3g average bits", math.ceil(max_excess * total / g), unit)
    return np.ceil(extra / total / unit - 1e-9).astype(np.int64), unit


def knapsack_allocations(space: SearchSpace, damage: np.ndarray, budgets: Sequence[float], max_units: int = 50_000) -> np.ndarray:
    """Allocations minimising the summed `damage` at average bits <= each budget (rows in budget order).

    `damage` is the [n_genes, n_widths] table of `additive_damage` (inf for choices a gene lacks).
    A budget below the lowest reachable average gives the all-lowest allocation.
    """
    base = float(space.avg_bits(np.zeros(space.n_genes, dtype=int)))
    excess = [max(float(b) - base, 0.0) for b in budgets]
    weights, unit = _integer_weights(space, max(max(excess), 1e-12), max_units)
    cap = int(math.floor(max(excess) / unit + 1e-6))
    # best[c]: least damage of the genes so far using at most c units; choice[i, c]: gene i's width there
    best = np.zeros(cap + 1)
    choice = np.zeros((space.n_genes, cap + 1), dtype=np.int8)
    for i in range(space.n_genes):
        new = np.full(cap + 1, np.inf)
        for j in range(int(space.sizes[i])):
            w = int(weights[i, j])
            if w > cap or not np.isfinite(damage[i, j]):
                continue
            cand = np.full(cap + 1, np.inf)
            cand[w:] = best[: cap + 1 - w] + damage[i, j]
            better = cand < new
            new[better] = cand[better]
            choice[i, better] = j
        best = new
    out = np.zeros((len(budgets), space.n_genes), dtype=int)
    for r, e in enumerate(excess):
        c = int(math.floor(e / unit + 1e-6))
        for i in reversed(range(space.n_genes)):
            out[r, i] = choice[i, c]
            c -= int(weights[i, out[r, i]])
    return out
