"""The metric interface: a callable that scores the model as it currently is (lower is better)."""

from __future__ import annotations

from typing import Hashable, Protocol, Sequence

from torch import nn


class QualityMetric(Protocol):
    name: str
    description: str

    def settings(self) -> dict:
        """What determines its values besides the model and the data (the evaluation cache key)."""
        ...

    def evaluate(self, model: nn.Module, states: Sequence[Hashable] | None = None) -> float:
        """Score `model` with whatever weights are swapped in right now.

        `states` (one per decoder block: the bits of its linears) may let the metric skip the
        blocks that did not change since its last pass; None: the weights may have changed anywhere."""
        ...

    def subset(self, n_samples: int) -> "QualityMetric":
        """The same metric on fewer calibration samples (the sensitivity stage uses it)."""
        ...
