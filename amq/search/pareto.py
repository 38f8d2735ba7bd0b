"""Pareto utilities on (metric, average bits), both minimised."""

from __future__ import annotations

import numpy as np
from pymoo.indicators.hv import HV
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

HV_REFERENCE = (1.1, 1.1)
HV_CONVENTION = (
    "hypervolume of (metric / metric of the all-lowest-bits config, (bits - min bits) / (max bits - min bits)), reference point (1.1, 1.1); higher is better"
)


def nondominated(F: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated rows of F (n x 2)."""
    if len(F) == 0:
        return np.array([], dtype=int)
    return np.asarray(NonDominatedSorting().do(np.asarray(F, dtype=float), only_non_dominated_front=True), dtype=int)


def front_ranks(F: np.ndarray) -> np.ndarray:
    """Non-dominated sorting rank of every row (0 = on the front)."""
    ranks = np.empty(len(F), dtype=int)
    for r, idx in enumerate(NonDominatedSorting().do(np.asarray(F, dtype=float))):
        ranks[idx] = r
    return ranks


def normalized_hypervolume(metric: np.ndarray, bits: np.ndarray, metric_scale: float, bits_range: tuple[float, float]) -> float:
    """Hypervolume in the normalised space described by HV_CONVENTION (comparable across iterations)."""
    lo, hi = bits_range
    F = np.column_stack([np.asarray(metric) / max(metric_scale, 1e-12), (np.asarray(bits) - lo) / max(hi - lo, 1e-12)])
    F = F[nondominated(F)]
    F = F[(F < np.array(HV_REFERENCE)).all(axis=1)]
    if len(F) == 0:
        return 0.0
    return float(HV(ref_point=np.array(HV_REFERENCE))(F))


def best_under_target(metric: np.ndarray, bits: np.ndarray, target: float) -> int | None:
    """Index of the lowest metric among configurations whose bits do not exceed `target` (None if none)."""
    ok = np.flatnonzero(np.asarray(bits) <= target + 1e-9)
    if len(ok) == 0:
        return None
    return int(ok[np.argmin(np.asarray(metric)[ok])])
