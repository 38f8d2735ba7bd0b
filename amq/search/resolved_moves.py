"""Re-solved moves: the allocation at a target solved again under what the predictor has learned.

The initial design's knapsack allocations minimise the sensitivity table's additive damage. The
true evaluations then teach the predictor where that table is wrong (interactions, noisy probes),
but random local moves (amq.search.local_moves) only try a few trades at a time around the
incumbent. A re-solved move asks the predictor, for every linear and width, what setting that one
gene would change from the incumbent, then solves the multiple-choice knapsack at the target on
those predicted changes: the best allocation under the predictor's corrected damages, in one step.

The predicted changes are local (one gene at a time, around the incumbent), so a solution far from
the incumbent trusts them the most. Each entry of `penalties` (in units of the median predicted
change) is charged to every gene that leaves the incumbent's width, giving a ladder of solutions
from the unconstrained one (penalty 0) to ones that change only what pays most. The loop
(amq.search.loop) gives the best-scored of them a target's first slot of each iteration and ranks
the rest with the random neighbours: a knapsack on a predictor's changes seeks out where the
predictor is most optimistic, so without that limit a poorly fitted predictor would fill every
target slot with its own errors.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from amq.search.knapsack import knapsack_allocations
from amq.search.local_moves import BITS_EPS
from amq.search.space import SearchSpace

DEFAULT_PENALTIES = (0.0, 0.25, 1.0, 4.0)


def single_gene_changes(space: SearchSpace, incumbent: np.ndarray, predict: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """[n_genes, max widths]: the predicted metric of the incumbent with one gene set to each width,
    minus the incumbent's own (0 at the incumbent's width, inf where a gene lacks the width)."""
    incumbent = np.asarray(incumbent, dtype=int)
    genes, widths = zip(*[(i, c) for i in range(space.n_genes) for c in range(int(space.sizes[i])) if c != incumbent[i]])
    variants = np.repeat(incumbent[None, :], len(genes) + 1, axis=0)  # row 0: the incumbent itself
    variants[np.arange(1, len(genes) + 1), genes] = widths
    predicted = predict(variants)
    changes = np.full((space.n_genes, int(space.sizes.max())), np.inf)
    changes[np.arange(space.n_genes), incumbent] = 0.0
    changes[list(genes), list(widths)] = predicted[1:] - predicted[0]
    return changes


def resolved_moves(
    space: SearchSpace,
    incumbent: np.ndarray,
    target: float,
    predict: Callable[[np.ndarray], np.ndarray],
    penalties: Sequence[float] = DEFAULT_PENALTIES,
) -> np.ndarray:
    """Distinct knapsack solutions at `target` on the predicted single-gene changes, one per penalty
    (charged per changed gene, in units of the median |change|); the incumbent itself is left out."""
    incumbent = np.asarray(incumbent, dtype=int)
    changes = single_gene_changes(space, incumbent, predict)
    finite = changes[np.isfinite(changes) & (changes != 0)]
    unit = float(np.median(np.abs(finite))) if len(finite) else 0.0
    moved = np.ones_like(changes)
    moved[np.arange(space.n_genes), incumbent] = 0.0
    rows = [knapsack_allocations(space, changes + p * unit * moved, [target])[0] for p in penalties]
    cands = np.unique(np.stack(rows), axis=0)
    keep = (space.avg_bits(cands) <= target + BITS_EPS) & (cands != incumbent[None, :]).any(axis=1)
    return cands[keep]
