"""The predictor interface and the input/target encodings every predictor shares."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from amq.errors import InvalidArgument

TARGETS = ("none", "log")


@runtime_checkable
class Predictor(Protocol):
    """`fit` returns self; `predict` returns the predicted metric (lower is better) per row.

    Inputs are the search space's features: one column per gene, its bit width scaled to [0, 1].
    """

    name: str

    def fit(self, X: np.ndarray, y: np.ndarray) -> "Predictor": ...

    def predict(self, X: np.ndarray) -> np.ndarray: ...


@runtime_checkable
class UncertainPredictor(Predictor, Protocol):
    """A predictor that also gives a predictive standard deviation (in metric units)."""

    def predict_dist(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class TargetTransform:
    """An optional log transform of the target.

    JSD spans orders of magnitude across the bits axis; fitting log(metric) keeps the low-error
    configurations (the ones that matter) from being drowned out.
    """

    def __init__(self, target: str = "log", eps: float = 1e-8) -> None:
        if target not in TARGETS:
            raise InvalidArgument("target", f"{target!r}", ", ".join(TARGETS))
        self.target, self.eps = target, eps

    def forward(self, y: np.ndarray) -> np.ndarray:
        y = np.asarray(y, dtype=np.float64)
        return np.log(np.maximum(y, 0.0) + self.eps) if self.target == "log" else y

    def inverse(self, z: np.ndarray) -> np.ndarray:
        return np.exp(z) - self.eps if self.target == "log" else z
