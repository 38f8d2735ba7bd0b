"""NSGA-II (pymoo) on (predicted metric, average bits): cheap, since only the predictor is queried."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.problem import Problem
from pymoo.operators.crossover.pntx import TwoPointCrossover
from pymoo.operators.mutation.pm import PM
from pymoo.operators.repair.rounding import RoundingRepair
from pymoo.optimize import minimize

from amq.errors import InvalidArgument, require_at_least
from amq.search.space import SearchSpace


class PredictedQualityProblem(Problem):
    """Minimise (predicted metric, average bits) over integer genes, optionally within a bits window."""

    def __init__(self, space: SearchSpace, score: Callable[[np.ndarray], np.ndarray], bits_window: tuple[float, float] | None = None) -> None:
        self.space, self.score, self.bits_window = space, score, bits_window
        super().__init__(
            n_var=space.n_genes,
            n_obj=2,
            n_ieq_constr=2 if bits_window else 0,
            xl=0,
            xu=space.sizes - 1,
            vtype=int,
        )

    def _evaluate(self, X: np.ndarray, out: dict, *args, **kwargs) -> None:
        X = np.rint(X).astype(int)
        bits = self.space.avg_bits(X)
        out["F"] = np.column_stack([self.score(X), bits])
        if self.bits_window:
            lo, hi = self.bits_window
            out["G"] = np.column_stack([lo - bits, bits - hi])


@dataclass
class NSGA2Settings:
    """The reference: population 200, 20 generations, two-point crossover 0.9, mutation 0.1.

    Genes are small integers (2-4 choices), so the polynomial mutation uses a low distribution
    index (eta 1): with the usual eta 20 a perturbation almost never rounds to another choice.
    """

    pop_size: int = 200
    n_gen: int = 20
    crossover_prob: float = 0.9
    mutation_prob: float = 0.1
    mutation_eta: float = 1.0

    def __post_init__(self) -> None:
        require_at_least(self, "pop_size", 4)
        require_at_least(self, "n_gen", 1)
        for key in ("crossover_prob", "mutation_prob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise InvalidArgument(key, f"{getattr(self, key)}", "a probability in [0, 1]")


def run_nsga2(
    problem: PredictedQualityProblem,
    settings: NSGA2Settings,
    initial: np.ndarray,
    seed: int,
    window: tuple[float, float] | None = None,
    n_offsprings: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Run NSGA-II seeded with `initial` (padded with random genes, inside `window` when given);
    returns the final population (X, F). `n_offsprings` per generation defaults to the population size."""
    rng = np.random.default_rng(seed)
    init = np.unique(np.asarray(initial, dtype=int), axis=0)[: settings.pop_size]
    if len(init) < settings.pop_size:
        extra = problem.space.random(rng, settings.pop_size - len(init), window)
        init = np.vstack([init, extra]) if len(init) else extra
    algorithm = NSGA2(
        pop_size=settings.pop_size,
        n_offsprings=n_offsprings,
        sampling=init.astype(float),
        crossover=TwoPointCrossover(prob=settings.crossover_prob),
        mutation=PM(prob=1.0, prob_var=settings.mutation_prob, eta=settings.mutation_eta, vtype=float, repair=RoundingRepair()),
        eliminate_duplicates=True,
    )
    res = minimize(problem, algorithm, ("n_gen", settings.n_gen), seed=seed, verbose=False)
    pop = res.pop
    return np.rint(pop.get("X")).astype(int), pop.get("F")
