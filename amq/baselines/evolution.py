"""The AMQ search without its predictor: NSGA-II whose objective is the true evaluation.

The ablation keeps everything else of the search: the pruned space, the bits window, the NSGA-II
operators and the initial design (the archive passed in, already evaluated). Each generation
breeds `batch_size` offspring and evaluates them for real, for `iterations` generations, so it
spends at most the search's own number of true evaluations. Offspring already in the archive are
not evaluated again and offspring outside the bits window are rejected unevaluated (both cost
nothing), so it may spend fewer.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable

import numpy as np

from amq.search.archive import Archive
from amq.search.loop import SearchSettings, search_bits_range
from amq.search.nsga import PredictedQualityProblem, run_nsga2

log = logging.getLogger(__name__)


def true_evaluation_nsga2(
    archive: Archive,
    evaluate: Callable[[np.ndarray], tuple[float, float]],
    settings: SearchSettings,
    metric_name: str,
    seed: int,
) -> Archive:
    """Evolve from the configurations in `archive`, adding every new true evaluation to it."""
    space = archive.space
    known = {space.key(r.genes): r.metric for r in archive.records}
    lo, hi = search_bits_range(space, settings) if settings.bits_window else (-math.inf, math.inf)
    generation = 0

    def true_metric(X: np.ndarray) -> np.ndarray:
        nonlocal generation
        out = np.empty(len(X))
        bits = space.avg_bits(X)
        for r, genes in enumerate(X):
            key = space.key(genes)
            if key not in known and lo - 1e-9 <= bits[r] <= hi + 1e-9:
                result = evaluate(genes)
                archive.add(genes, result, generation, metric_name)
                known[key] = result.value
            out[r] = known.get(key, math.inf)
        log.info("no-predictor NSGA-II: generation %d, %d configurations evaluated", generation, len(archive))
        generation += 1
        return out

    initial = np.stack([r.genes for r in archive.records])
    problem = PredictedQualityProblem(space, true_metric, settings.bits_window)
    nsga = dataclasses.replace(settings.nsga, pop_size=len(initial), n_gen=settings.iterations + 1)
    run_nsga2(problem, nsga, initial, seed=seed, n_offsprings=settings.batch_size)
    return archive
