"""RBF interpolant (the AMQ reference's predictor): cubic kernel with a linear polynomial tail.

Two implementations of the same interpolant: `backend=torch` (amq.predictors.rbf_torch: distances
by matrix products on all cores or a GPU, float64 solve) and `backend=scipy`
(`scipy.interpolate.RBFInterpolator`, single-threaded loops, about 30 s per fit at 10,000 archived
configurations). Only scipy's has the `neighbors` option (a local interpolant per query point).
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
from scipy.interpolate import RBFInterpolator

from amq.devices import resolve_device
from amq.errors import InvalidArgument
from amq.predictors.base import TargetTransform
from amq.predictors.rbf_torch import DEGREES, KERNELS, TorchRBFInterpolant

log = logging.getLogger(__name__)

BACKENDS = ("torch", "scipy")
# Smoothing of the retry when the exact system is singular.
FALLBACK_SMOOTHING = 1e-6


def merge_duplicates(Z: np.ndarray, t: np.ndarray, smoothing: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row per distinct point (first-seen order), its mean target, and smoothing / multiplicity.

    Exact interpolation cannot pass through two values at one point, and repeated rows make the
    system singular (scipy then returns coefficients of 1e30 and more that cancel only by luck).
    With smoothing s, k repeats of a point weigh like one point with their mean and smoothing s / k,
    so this changes nothing where the system was well posed.
    """
    _, first, inverse, counts = np.unique(Z, axis=0, return_index=True, return_inverse=True, return_counts=True)
    order = np.argsort(first)  # keep the archive's order
    mean = np.bincount(inverse.ravel(), weights=t) / counts
    return Z[first[order]], mean[order], smoothing / counts[order]


class RBFPredictor:
    name = "rbf"

    def __init__(
        self,
        kernel: str = "cubic",
        degree: int = 1,
        smoothing: float = 0.0,
        neighbors: int | None = None,
        target: str = "log",
        backend: str = "torch",
        device: str = "auto",
        seed: int = 0,
    ) -> None:
        self.transform = TargetTransform(target)
        if kernel not in KERNELS:
            raise InvalidArgument("kernel", f"{kernel!r}", ", ".join(KERNELS))
        if backend not in BACKENDS:
            raise InvalidArgument("backend", f"{backend!r}", ", ".join(BACKENDS))
        if smoothing < 0:
            raise InvalidArgument("smoothing", f"{smoothing} is negative", "a number >= 0")
        if backend == "torch":
            if neighbors is not None:
                raise InvalidArgument("neighbors", "a local interpolant exists only with backend=scipy", "null with backend=torch")
            if degree not in DEGREES:
                raise InvalidArgument("degree", f"{degree} with backend=torch", ", ".join(map(str, DEGREES)))
            self.device = resolve_device(device, "device")
        else:
            if device not in ("auto", "cpu"):
                raise InvalidArgument("device", f"{device!r} with backend=scipy (CPU only)", "auto, cpu")
            self.device = None
        self.kernel, self.degree, self.smoothing, self.neighbors, self.backend = kernel, degree, smoothing, neighbors, backend
        self._model: RBFInterpolator | TorchRBFInterpolant | None = None

    def _interpolant(self, Z: np.ndarray, t: np.ndarray, smoothing: np.ndarray, degree: int) -> RBFInterpolator | TorchRBFInterpolant:
        if self.backend == "torch":
            return TorchRBFInterpolant(Z, t, smoothing, kernel=self.kernel, degree=degree, device=self.device)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*should not be below.*", category=UserWarning)
            return RBFInterpolator(Z, t, smoothing=smoothing, kernel=self.kernel, degree=degree, neighbors=self.neighbors)

    def fit(self, X: np.ndarray, y: np.ndarray) -> "RBFPredictor":
        Z, t, smoothing = merge_duplicates(np.atleast_2d(X).astype(np.float64), self.transform.forward(y), self.smoothing)
        # A linear tail needs more points than dimensions; with fewer, fall back to a constant tail.
        degree = self.degree if self.degree < 1 or len(Z) > Z.shape[1] else 0
        # Singular systems: smooth a little; if the linear tail itself is rank deficient (a gene
        # constant over the archive, all points on one hyperplane), keep only its constant term.
        smoothed = np.maximum(smoothing, FALLBACK_SMOOTHING)
        attempts = [(smoothing, degree), (smoothed, degree), (smoothed, min(degree, 0))]
        for s, deg in attempts[:-1]:
            try:
                self._model = self._interpolant(Z, t, s, deg)
                return self
            except np.linalg.LinAlgError:
                log.info("RBF system on %d points is singular; retrying with smoothing, then a constant tail", len(Z))
        self._model = self._interpolant(Z, t, *attempts[-1])
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        if self._model is None:
            raise RuntimeError("RBFPredictor.predict called before fit")
        return self.transform.inverse(self._model(np.atleast_2d(X).astype(np.float64)))
