"""Predictor accuracy on configurations it was not fitted on (rank agreement matters most).

A batch of new configurations spreads along the bits axis, so any predictor that only knows that
fewer bits hurt ranks it almost perfectly: a Kendall tau over the whole batch is near 1 whatever
the predictor has learnt. What the search needs is the order of configurations at equal bits (which
of two 4-bit allocations is better), and the error where the targets are. So besides the overall
scores (named `..._all_bits` to say what they measure), the batch is cut into bins of average bits
and the tau is pooled over pairs within one bin; a prediction that is constant within a bin scores 0
there, as a bits-only predictor does.

One batch has few pairs inside a bin, so the search also pools over iterations (`pooled_scores`):
every evaluated record keeps the prediction made when it was proposed, and pairs are formed within
one iteration and one bin, so each pair is judged by the one predictor that ranked it (pairs across
iterations would compare two predictors' offsets, which a bits-only predictor refitted on better
data would "win").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import kendalltau, spearmanr

BIN_WIDTH = 0.25  # average bits per bin: configurations closer than this compete for the same budget


def _tau(p: np.ndarray, a: np.ndarray) -> float | None:
    if len(p) < 2:
        return None
    if np.ptp(p) == 0:
        return 0.0  # no ranking information
    if np.ptp(a) == 0:
        return None
    tau = kendalltau(p, a).statistic
    return None if np.isnan(tau) else float(tau)


def within_bits_tau(
    predicted: np.ndarray,
    actual: np.ndarray,
    bits: np.ndarray,
    bin_width: float = BIN_WIDTH,
    groups: np.ndarray | None = None,
) -> tuple[float | None, int]:
    """Kendall tau pooled over pairs of configurations in the same bin of average bits (weighted by
    each bin's number of pairs), and that number of pairs; with `groups` (e.g. the iteration that
    proposed each configuration) a pair must also share its group."""
    bins = np.floor(np.asarray(bits, float) / bin_width).astype(int)
    keys = bins[:, None] if groups is None else np.column_stack([np.asarray(groups, int), bins])
    cells = np.unique(keys, axis=0, return_inverse=True)[1].reshape(-1) if len(keys) else bins
    total, pairs = 0.0, 0
    for c in np.unique(cells):
        idx = cells == c
        n = int(idx.sum())
        tau = _tau(predicted[idx], actual[idx])
        if tau is not None:
            total += tau * n * (n - 1) / 2
            pairs += n * (n - 1) // 2
    return (total / pairs if pairs else None), pairs


def heldout_scores(
    predicted: np.ndarray,
    actual: np.ndarray,
    bits: np.ndarray | None = None,
    targets: Sequence[float] = (),
    bin_width: float = BIN_WIDTH,
) -> dict[str, float | int | None]:
    """Rank agreement and errors of `predicted` against `actual` (finite pairs only): overall, within
    bins of average `bits`, and relative error within half a bin of any of `targets`."""
    predicted, actual = np.asarray(predicted, float), np.asarray(actual, float)
    ok = np.isfinite(predicted) & np.isfinite(actual)
    p, a = predicted[ok], actual[ok]
    out: dict[str, float | int | None] = {
        "predictor/kendall_tau_all_bits": None,
        "predictor/spearman_all_bits": None,
        "predictor/kendall_tau_within_bits": None,
        "predictor/pairs_within_bits": 0,
        "predictor/rel_error_near_targets": None,
        "predictor/rmse": None,
        "predictor/n_heldout": int(len(p)),
    }
    if len(p) < 2:
        return out
    rho = spearmanr(p, a).statistic if np.ptp(p) and np.ptp(a) else float("nan")
    out["predictor/kendall_tau_all_bits"] = _tau(p, a)
    out["predictor/spearman_all_bits"] = None if np.isnan(rho) else float(rho)
    out["predictor/rmse"] = float(np.sqrt(np.mean((p - a) ** 2)))
    if bits is not None:
        b = np.asarray(bits, float)[ok]
        out["predictor/kendall_tau_within_bits"], out["predictor/pairs_within_bits"] = within_bits_tau(p, a, b, bin_width)
        out["predictor/rel_error_near_targets"] = rel_error_near_targets(p, a, b, targets, bin_width)
    return out


def rel_error_near_targets(predicted: np.ndarray, actual: np.ndarray, bits: np.ndarray, targets: Sequence[float], bin_width: float = BIN_WIDTH) -> float | None:
    """Mean |predicted - actual| / |actual| of the configurations within half a bin of any target (None: none there)."""
    near = np.zeros(len(bits), dtype=bool)
    for t in targets:
        near |= np.abs(np.asarray(bits, float) - float(t)) <= bin_width / 2
    if not near.any():
        return None
    return float(np.mean(np.abs(predicted[near] - actual[near]) / np.maximum(np.abs(actual[near]), 1e-12)))


def pooled_scores(
    predicted: np.ndarray,
    actual: np.ndarray,
    bits: np.ndarray,
    iterations: np.ndarray,
    targets: Sequence[float] = (),
    bin_width: float = BIN_WIDTH,
) -> dict[str, float | int | None]:
    """Accuracy of proposal-time predictions pooled over iterations (finite pairs only): the
    within-bits tau over pairs of one iteration and one bin, and the relative error near `targets`.

    Every prediction was made before its configuration was evaluated, so all of it is held out."""
    predicted, actual = np.asarray(predicted, float), np.asarray(actual, float)
    ok = np.isfinite(predicted) & np.isfinite(actual)
    p, a, b = predicted[ok], actual[ok], np.asarray(bits, float)[ok]
    tau, pairs = within_bits_tau(p, a, b, bin_width, groups=np.asarray(iterations, int)[ok])
    return {
        "predictor/kendall_tau_within_bits_pooled": tau,
        "predictor/pairs_within_bits_pooled": pairs,
        "predictor/rel_error_near_targets_pooled": rel_error_near_targets(p, a, b, targets, bin_width),
        "predictor/n_pooled": int(len(p)),
    }
