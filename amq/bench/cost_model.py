"""Projected wall time of a whole search from the measured cost of its stages.

A search is: build the proxy, compute the metric's reference once, measure the sensitivity of
every linear (one true evaluation each, plus the all-high baseline), evaluate the initial design,
then per iteration fit the predictor on the archive so far, run NSGA-II on it and evaluate a batch.
The predictor's fit grows with the archive, so it is measured at a few archive sizes and summed
over the iterations by interpolating between those measurements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np


@dataclass(frozen=True)
class MeasuredCurve:
    """Seconds as a function of archive size, from measurements at a few sizes.

    Interpolated on log-log axes (a power law between neighbouring measurements), so both the
    predictor's roughly cubic fit and NSGA-II's roughly linear prediction cost are followed
    closely; constant beyond the measured range.
    """

    sizes: tuple[float, ...]
    seconds: tuple[float, ...]

    @classmethod
    def measured(cls, sizes: Sequence[int], seconds: Sequence[float]) -> "MeasuredCurve":
        order = np.argsort(sizes)
        return cls(tuple(float(sizes[i]) for i in order), tuple(max(float(seconds[i]), 1e-9) for i in order))

    @classmethod
    def from_steps(cls, steps: Sequence[Mapping[str, float]], key: str) -> "MeasuredCurve":
        """From `amq.bench.timing.search_step_seconds` results: `key` ("fit_s" or "nsga_s") against "n_points"."""
        return cls.measured([int(s["n_points"]) for s in steps], [float(s[key]) for s in steps])

    def __call__(self, n: float) -> float:
        return float(np.exp(np.interp(np.log(n), np.log(self.sizes), np.log(self.seconds))))


@dataclass(frozen=True)
class SearchWork:
    """How much work a search does (the budget group's amounts)."""

    n_uniform: int
    n_initial_random: int
    iterations: int
    batch_size: int
    n_linears: int

    @classmethod
    def from_budget(cls, budget: Any, n_uniform: int, n_linears: int) -> "SearchWork":
        """The amounts of a budget config node (conf/budget/*.yaml)."""
        return cls(n_uniform, int(budget.n_initial_random), int(budget.iterations), int(budget.batch_size), n_linears)

    @property
    def initial_design(self) -> int:
        return self.n_uniform + self.n_initial_random

    @property
    def true_evaluations(self) -> int:
        return self.initial_design + self.iterations * self.batch_size

    def archive_sizes(self) -> list[int]:
        """Archive size when each iteration fits its predictor (records of earlier iterations)."""
        return [self.initial_design + i * self.batch_size for i in range(self.iterations)]


@dataclass(frozen=True)
class StageCosts:
    """Measured seconds per unit of each stage."""

    proxy_build_s: float
    reference_s: float
    true_eval_s: float
    sensitivity_eval_s: float
    predictor_fit: MeasuredCurve
    nsga_iteration: MeasuredCurve


def project(work: SearchWork, costs: StageCosts) -> dict[str, float]:
    """Seconds per stage and in total for `work` at `costs` (the selection and I/O are left out: milliseconds)."""
    sizes = work.archive_sizes()
    parts = {
        "proxy_build_s": costs.proxy_build_s,
        "reference_s": costs.reference_s,
        "sensitivity_s": (work.n_linears + 1) * costs.sensitivity_eval_s,
        "true_evaluations_s": work.true_evaluations * costs.true_eval_s,
        "predictor_fit_s": sum(costs.predictor_fit(n) for n in sizes),
        "nsga_s": sum(costs.nsga_iteration(n) for n in sizes),
    }
    return {**parts, "total_s": sum(parts.values())}
