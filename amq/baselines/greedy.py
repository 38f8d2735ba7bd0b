"""Greedy bit allocation by the sensitivity table: the allocator a user would write first.

Start with every gene at its lowest width. Repeatedly take the single upgrade (one gene to any
higher width) with the largest predicted damage reduction per extra average bit among those that
still fit the budget; stop when nothing fits or nothing reduces the predicted damage. Cheap and
usually close to the optimum of the additive model, but not optimal: an upgrade that does not fit
is skipped for smaller ones, and an early choice is never revisited (see `knapsack` for the exact
allocation).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from amq.search.space import SearchSpace


def greedy_allocation(space: SearchSpace, damage: np.ndarray, budget: float) -> np.ndarray:
    """Genes whose average bits (with scale/zero) do not exceed `budget`.

    `damage` is the [n_genes, n_widths] table of `additive_damage` (inf for choices a gene lacks).
    A budget below the lowest reachable average gives the all-lowest allocation.
    """
    bits = space.choice_bits
    rows = np.arange(space.n_genes)
    share = space.gene_share[:, None]
    genes = np.zeros(space.n_genes, dtype=int)
    while True:
        spent = float(space.avg_bits(genes))
        extra = share * (bits - bits[rows, genes][:, None])
        gain = damage[rows, genes][:, None] - damage
        ok = np.isfinite(damage) & (extra > 0) & (gain > 0) & (spent + extra <= budget + 1e-12)
        if not ok.any():
            return genes
        ratio = np.where(ok, gain / np.where(ok, extra, 1.0), -np.inf)
        i, j = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
        genes[i] = j


def greedy_allocations(space: SearchSpace, damage: np.ndarray, budgets: Sequence[float]) -> np.ndarray:
    """One greedy allocation per budget, rows in the order of `budgets` (repeats are possible)."""
    return np.stack([greedy_allocation(space, damage, b) for b in budgets])
