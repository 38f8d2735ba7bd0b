"""RBF interpolant (the AMQ reference's predictor): cubic kernel with a linear polynomial tail."""

from __future__ import annotations

import warnings

import numpy as np
from scipy.interpolate import RBFInterpolator

from amq.predictors.base import TargetTransform


class RBFPredictor:
    name = "rbf"

    def __init__(
        self,
        kernel: str = "cubic",
        degree: int = 1,
        smoothing: float = 0.0,
        neighbors: int | None = None,
        target: str = "log",
        seed: int = 0,
    ) -> None:
        self.transform = TargetTransform(target)
        self.kernel, self.degree, self.smoothing, self.neighbors = kernel, degree, smoothing, neighbors
        self._model: RBFInterpolator | None = None

    def fit(self, X: np.ndarray, y: np.ndarray) -> "RBFPredictor":
        Z = np.atleast_2d(X).astype(np.float64)
        t = self.transform.forward(y)
        # A linear tail needs more points than dimensions; with fewer, fall back to a constant tail.
        degree = self.degree if self.degree < 1 or len(Z) > Z.shape[1] else 0
        kw = dict(kernel=self.kernel, degree=degree, neighbors=self.neighbors)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*should not be below.*", category=UserWarning)
            try:
                self._model = RBFInterpolator(Z, t, smoothing=self.smoothing, **kw)
            except np.linalg.LinAlgError:  # too few or degenerate points for an exact interpolant
                self._model = RBFInterpolator(Z, t, smoothing=max(self.smoothing, 1e-6), **kw)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        if self._model is None:
            raise RuntimeError("RBFPredictor.predict called before fit")
        return self.transform.inverse(self._model(np.atleast_2d(X).astype(np.float64)))
