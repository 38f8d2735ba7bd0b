"""Predictor accuracy on configurations it was not fitted on (rank agreement matters most)."""

from __future__ import annotations

import numpy as np
from scipy.stats import kendalltau, spearmanr


def heldout_scores(predicted: np.ndarray, actual: np.ndarray) -> dict[str, float | None]:
    """Kendall tau, Spearman rho and RMSE of `predicted` against `actual` (finite pairs only)."""
    predicted, actual = np.asarray(predicted, float), np.asarray(actual, float)
    ok = np.isfinite(predicted) & np.isfinite(actual)
    p, a = predicted[ok], actual[ok]
    if len(p) < 2:
        return {"predictor/kendall_tau": None, "predictor/spearman": None, "predictor/rmse": None, "predictor/n_heldout": int(len(p))}
    tau = kendalltau(p, a).statistic
    rho = spearmanr(p, a).statistic
    return {
        "predictor/kendall_tau": None if np.isnan(tau) else float(tau),
        "predictor/spearman": None if np.isnan(rho) else float(rho),
        "predictor/rmse": float(np.sqrt(np.mean((p - a) ** 2))),
        "predictor/n_heldout": int(len(p)),
    }
