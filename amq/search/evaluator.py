"""True evaluation of a configuration: swap the proxy weights in, run the metric."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from amq.metrics.base import QualityMetric
from amq.proxy.bank import ProxyBank
from amq.search.space import SearchSpace


@dataclass(frozen=True)
class Evaluation:
    """One true evaluation.

    A non-finite metric (NaN or inf, e.g. an overflow in a low-precision forward) is a failed
    evaluation: `value` is inf, so it never lands on the front or in the predictor's training set,
    and `failure` says why. `reused` marks a value taken from the evaluation cache.
    """

    value: float
    seconds: float
    failure: str | None = None
    reused: bool = False

    @property
    def ok(self) -> bool:
        return self.failure is None


def measured(value: float, seconds: float, metric_name: str) -> Evaluation:
    """An Evaluation of a raw metric value, failed when the value is not finite."""
    if math.isfinite(value):
        return Evaluation(float(value), seconds)
    return Evaluation(math.inf, seconds, failure=f"{metric_name} is {value} (not finite)")


class Evaluate(Protocol):
    def __call__(self, genes: np.ndarray) -> Evaluation: ...


@dataclass
class ProxyEvaluator:
    """A true evaluation: the proxy's weights for the configuration swapped in, the metric measured."""

    bank: ProxyBank
    metric: QualityMetric
    space: SearchSpace

    def __call__(self, genes: np.ndarray) -> Evaluation:
        t0 = time.perf_counter()
        self.bank.apply(self.space.to_bits(genes))
        value = self.metric.evaluate(self.bank.model, self.bank.block_states())
        return measured(value, time.perf_counter() - t0, self.metric.name)
