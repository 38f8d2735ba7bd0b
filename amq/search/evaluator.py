"""True evaluation of a configuration: swap the proxy weights in, run the metric."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from amq.metrics.base import QualityMetric
from amq.proxy.bank import ProxyBank
from amq.search.space import SearchSpace


@dataclass
class ProxyEvaluator:
    bank: ProxyBank
    metric: QualityMetric
    space: SearchSpace

    def __call__(self, genes: np.ndarray) -> tuple[float, float]:
        """(metric, seconds) of one configuration; a non-finite metric is returned as inf."""
        t0 = time.perf_counter()
        self.bank.apply(self.space.to_bits(genes))
        value = self.metric.evaluate(self.bank.model)
        return (value if math.isfinite(value) else math.inf), time.perf_counter() - t0
