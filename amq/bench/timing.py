"""Timing of the search's stages, shared by the speed benchmarks (CPU and GPU).

Device work is asynchronous, so every measurement synchronises the device before reading the
clock; each is the median of repeated runs after one warm-up left to the caller.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from amq.metrics.base import QualityMetric
from amq.metrics.divergence import forward_logits
from amq.predictors.base import Predictor
from amq.proxy.bank import ProxyBank
from amq.search.nsga import NSGA2Settings, PredictedQualityProblem, run_nsga2
from amq.search.space import SearchSpace


def synchronizer(device: torch.device | str) -> Callable[[], None]:
    """A no-argument call that waits for queued work on `device` (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def median_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    """Median wall time of `repeats` calls of `fn`, the device synchronised before each clock read."""
    times = []
    for _ in range(max(1, repeats)):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def forward_floor_seconds(model: nn.Module, tokens: torch.Tensor, batch_size: int, repeats: int, sync: Callable[[], None]) -> float:
    """The floor of a true evaluation: the unquantized forward over the same tokens, same batching."""
    batches = list(torch.split(tokens, batch_size))

    def forward() -> None:
        with torch.inference_mode():
            for ids in batches:
                forward_logits(model, ids)

    forward()  # warm-up
    return median_seconds(forward, repeats, sync)


def true_eval_seconds(bank: ProxyBank, metric: QualityMetric, configs: Sequence[Mapping[str, int]], repeats: int, sync: Callable[[], None]) -> float:
    """A true evaluation as the search does it: swap a configuration in, then score it.

    Needs `repeats + 1` configurations (the first is the warm-up, which also compiles).
    """
    it = iter(configs)

    def one() -> None:
        bank.apply(next(it))
        metric.evaluate(bank.model)

    one()
    return median_seconds(one, repeats, sync)


def swap_seconds(bank: ProxyBank, a: Mapping[str, int], b: Mapping[str, int], repeats: int, sync: Callable[[], None]) -> float:
    """One swap between two full configurations (what a true evaluation adds before its forward)."""
    bank.apply(a)
    return median_seconds(lambda: (bank.apply(b), bank.apply(a)), repeats, sync) / 2


def spread_linears(names: Sequence[str], n: int) -> list[str]:
    """`n` linears evenly spread over the model (first to last block): the probes a timing of the
    sensitivity stage should average over, since a probe's pass starts at its own block."""
    idx = np.unique(np.linspace(0, len(names) - 1, max(1, min(n, len(names)))).round().astype(int))
    return [names[i] for i in idx]


def sensitivity_seconds_per_linear(bank: ProxyBank, metric: QualityMetric, names: Sequence[str], low: int, high: int, sync: Callable[[], None]) -> float:
    """The sensitivity stage's cost per linear: drop it to `low`, score, put it back (others at
    `high`), each pass starting at the probed block as `amq.search.sensitivity.measure` does
    (give `names` from `spread_linears`, or the average leans to one end of the model)."""
    bank.apply({n: high for n in bank.layout.names})
    metric.evaluate(bank.model, bank.block_states())  # the all-high pass the probes start from
    sync()
    t0 = time.perf_counter()
    for n in names:
        bank.apply({n: low})
        metric.evaluate(bank.model, bank.block_states())
        bank.apply({n: high})
    sync()
    return (time.perf_counter() - t0) / len(names)


def search_step_seconds(space: SearchSpace, make_predictor: Callable[..., Predictor], nsga: NSGA2Settings, n_points: int, seed: int = 0) -> dict[str, float]:
    """One iteration's CPU work on an archive of `n_points`: the predictor's fit, then NSGA-II on it.

    The archive is random configurations with a smooth stand-in metric: fit and search time depend
    on the sizes, not on the values.
    """
    rng = np.random.default_rng(seed)
    X = space.random(rng, n_points)
    y = np.exp(-space.avg_bits(X)) * (1 + 0.1 * rng.random(len(X)))
    t0 = time.perf_counter()
    pred = make_predictor(seed=seed).fit(space.features(X), y)
    fit_s = time.perf_counter() - t0
    problem = PredictedQualityProblem(space, lambda g: pred.predict(space.features(g)))
    t0 = time.perf_counter()
    run_nsga2(problem, nsga, X[:10], seed=seed)
    return {"n_points": n_points, "fit_s": fit_s, "nsga_s": time.perf_counter() - t0}
