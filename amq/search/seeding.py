"""Warm-start configurations from the sensitivity table (an extension beyond the AMQ reference).

The sensitivity stage already measured each linear's damage at the lowest width. Assuming damage
is additive across linears and shrinks 4x per extra bit (quantization noise power scales as
2^-2b), the best allocation for a bits budget is a Lagrangian knapsack: for a price lambda per
bit, every gene independently picks the width minimising damage + lambda x bits. Sweeping lambda
gives a family of allocations from the lowest to the highest average bits; the initial design
takes the ones closest under evenly spaced bit levels. They cost a handful of true evaluations
and give the search a strong start where uniform and random configurations are weak.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from amq.search.space import SearchSpace


def allocation_family(space: SearchSpace, damage: Mapping[str, float], n_lambdas: int = 400) -> np.ndarray:
    """Distinct Lagrangian allocations (gene vectors), ordered by average bits."""
    low = space.bit_choices[0]
    gene_damage = np.array([sum(max(damage.get(n, 0.0), 0.0) for n in g) for g in space.groups])
    gene_numel = space.gene_numel
    table = space.choice_bits
    valid = np.arange(table.shape[1])[None, :] < space.sizes[:, None]
    cost = gene_damage[:, None] * np.power(4.0, -(table - low))
    cost = np.where(valid, cost, np.inf)
    scale = (gene_damage.max() + 1e-30) / gene_numel.min()
    out, seen = [], set()
    for lam in np.geomspace(scale * 1e-9, scale * 10, n_lambdas):
        genes = np.argmin(cost + lam * gene_numel[:, None] * table, axis=1)
        key = space.key(genes)
        if key not in seen:
            seen.add(key)
            out.append(genes)
    family = np.stack(out)
    return family[np.argsort(space.avg_bits(family))]


def sensitivity_seeds(space: SearchSpace, damage: Mapping[str, float], n: int, bits_range: tuple[float, float]) -> np.ndarray:
    """Up to `n` allocations, the best under each of `n` evenly spaced levels in `bits_range`."""
    if n <= 0:
        return np.zeros((0, space.n_genes), dtype=int)
    family = allocation_family(space, damage)
    fbits = space.avg_bits(family)
    lo, hi = bits_range
    picks: list[int] = []
    for level in np.linspace(lo, hi, n + 2)[1:-1]:
        under = np.flatnonzero(fbits <= level + 1e-12)
        if len(under) and int(under[-1]) not in picks:
            picks.append(int(under[-1]))
    return family[picks]
