"""Warm-start configurations from the sensitivity table (an extension beyond the AMQ reference).

The sensitivity stage already measured each linear's damage at the lowest width. Assuming damage
is additive across linears and scales with the width by a common factor (measured from the
uniform configurations when available, else 4x less per extra bit, since quantization noise power
scales as 2^-2b), the best allocation for a bits budget is a Lagrangian knapsack: for a price
lambda per bit, every gene independently picks the width minimising damage + lambda x bits.
Sweeping lambda gives a family of allocations from the lowest to the highest average bits; the
initial design takes the best one under each target and under evenly spaced levels. They cost a
handful of true evaluations and give the search a strong start where uniform and random
configurations are weak.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from amq.errors import InvalidArgument
from amq.search.knapsack import knapsack_allocations
from amq.search.space import SearchSpace


def width_factors(space: SearchSpace, uniform_metric: Mapping[int, float] | None = None, damage: Mapping[str, float] | None = None) -> np.ndarray:
    """Damage of each width relative to the lowest: measured from the uniform configurations, else 4^-(b - lowest).

    In a pruned space the "uniform" configurations are not uniform (pruned linears sit at a higher
    width), so their plain ratios understate how much the lowest width hurts. Given the sensitivity
    `damage`, the factors solve the additive model instead: uniform config r's metric is
    sum_w c_w x (measured damage of the linears it holds at width w), and the factors are c / c_lowest.
    Without pruning this is the plain ratio.
    """
    low = space.bit_choices[0]
    um = uniform_metric or {}
    if not all(np.isfinite(um.get(b, np.nan)) and um[b] > 0 for b in space.bit_choices):
        return np.array([4.0 ** -(b - low) for b in space.bit_choices])
    u = np.array([um[b] for b in space.bit_choices])
    if damage is None:
        return u / u[0]
    index = {b: i for i, b in enumerate(space.bit_choices)}
    held = np.zeros((len(u), len(u)))  # held[r, w]: measured damage of the linears uniform config r holds at width w
    for r, b in enumerate(space.bit_choices):
        for name, w in space.to_bits(space.uniform(b)).items():
            held[r, index[w]] += max(damage.get(name, 0.0), 0.0)
    c = np.linalg.lstsq(held, u, rcond=None)[0]
    return c / c[0] if np.all(np.isfinite(c)) and np.all(c > 0) else u / u[0]


def gene_damage(space: SearchSpace, damage: Mapping[str, float]) -> np.ndarray:
    """Measured damage of each gene at the lowest width: the sum over its linears (negative noise clipped to 0)."""
    return np.array([sum(max(damage.get(n, 0.0), 0.0) for n in g) for g in space.groups])


def additive_damage(
    space: SearchSpace, damage: Mapping[str, float], factors: np.ndarray | None = None, measured: Mapping[int, Mapping[str, float]] | None = None
) -> np.ndarray:
    """[n_genes, n_widths] predicted damage of each gene at each of its choices (inf past `sizes`).

    The model every sensitivity-based allocator here shares: damage adds up over genes, and a
    gene's damage at a width is its lowest-width damage times that width's factor. With
    `measured` damage at the middle widths (`SensitivityTable.mid`), every width's damage is what
    its probes measured, as an increase over the all-highest configuration (so the highest width
    costs 0): no width factor is assumed. A gene that shares one width across several linears
    sums their damages.
    """
    table = space.choice_bits
    valid = np.arange(table.shape[1])[None, :] < space.sizes[:, None]
    low_damage = gene_damage(space, damage)[:, None]
    if measured:
        cost = np.where(table == space.bit_choices[0], low_damage, 0.0)
        for bits, values in measured.items():
            cost = np.where(table == bits, gene_damage(space, values)[:, None], cost)
    else:
        factors = width_factors(space) if factors is None else np.asarray(factors, dtype=float)
        index = {b: i for i, b in enumerate(space.bit_choices)}
        cost = low_damage * factors[np.vectorize(index.get)(table.astype(int))]
    return np.where(valid, cost, np.inf)


def allocation_family(
    space: SearchSpace,
    damage: Mapping[str, float],
    factors: np.ndarray | None = None,
    n_lambdas: int = 400,
    measured: Mapping[int, Mapping[str, float]] | None = None,
) -> np.ndarray:
    """Distinct Lagrangian allocations (gene vectors), ordered by average bits."""
    cost = additive_damage(space, damage, factors, measured)
    gene_numel = space.gene_numel
    scale = (gene_damage(space, damage).max() + 1e-30) / gene_numel.min()
    out, seen = [], set()
    for lam in np.geomspace(scale * 1e-9, scale * 10, n_lambdas):
        genes = np.argmin(cost + lam * gene_numel[:, None] * space.choice_bits, axis=1)
        key = space.key(genes)
        if key not in seen:
            seen.add(key)
            out.append(genes)
    family = np.stack(out)
    return family[np.argsort(space.avg_bits(family))]


def budget_levels(n: int, bits_range: tuple[float, float], targets: Sequence[float] = ()) -> list[float]:
    """`n` average-bits levels: the targets inside `bits_range` first, then evenly spaced ones strictly inside it."""
    lo, hi = bits_range
    levels = [float(t) for t in targets if lo <= t <= hi][:n]
    return levels + [float(x) for x in np.linspace(lo, hi, n - len(levels) + 2)[1:-1]]


SEED_ALLOCATORS = ("lagrangian", "knapsack")


def sensitivity_seeds(
    space: SearchSpace,
    damage: Mapping[str, float],
    n: int,
    bits_range: tuple[float, float],
    targets: Sequence[float] = (),
    uniform_metric: Mapping[int, float] | None = None,
    allocator: str = "lagrangian",
    measured: Mapping[int, Mapping[str, float]] | None = None,
) -> np.ndarray:
    """Up to `n` allocations: the best under each target first, then under evenly spaced levels.

    `lagrangian` picks, under each level, the best allocation of the Lagrangian family (the convex
    hull of the additive model, which can leave part of a level's bits unspent); `knapsack` solves
    the additive model exactly at each level (`amq.search.knapsack`). `measured`: the damage
    probed at the middle widths (`additive_damage`).
    """
    if allocator not in SEED_ALLOCATORS:
        raise InvalidArgument("allocator", f"{allocator!r}", " or ".join(SEED_ALLOCATORS))
    if n <= 0:
        return np.zeros((0, space.n_genes), dtype=int)
    factors = None if measured else width_factors(space, uniform_metric, damage)  # measured widths need no factors
    levels = budget_levels(n, bits_range, targets)
    if allocator == "knapsack":
        genes = knapsack_allocations(space, additive_damage(space, damage, factors, measured), levels)
        _, first = np.unique(genes, axis=0, return_index=True)
        return genes[np.sort(first)]
    family = allocation_family(space, damage, factors, measured=measured)
    fbits = space.avg_bits(family)
    picks: list[int] = []
    for level in levels:
        under = np.flatnonzero(fbits <= level + 1e-12)
        if len(under) and int(under[-1]) not in picks:
            picks.append(int(under[-1]))
    return family[picks]
