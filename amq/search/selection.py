"""Choose which predicted candidates get a true evaluation: unseen, good, and spread along the bits axis."""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np

from amq.search.pareto import front_ranks


def select_batch(
    X: np.ndarray,
    predicted: np.ndarray,
    bits: np.ndarray,
    seen: set[str],
    key,
    batch_size: int,
    bits_range: tuple[float, float],
    targets: Sequence[float] = (),
) -> np.ndarray:
    """Pick up to `batch_size` rows of X.

    First, for each target, the best predicted candidate just under it (within one bin width):
    the budgets users asked about get a fresh candidate every iteration. Then the bits range is
    cut into equal bins; each bin contributes its best candidate (lowest non-dominated rank, then
    lowest predicted metric). Slots left are filled with the remaining candidates farthest (in
    bits) from those already chosen, best rank first.
    """
    keys = [key(x) for x in X]
    keep, uniq = [], set()
    for i, k in enumerate(keys):
        if k not in seen and k not in uniq:
            keep.append(i)
            uniq.add(k)
    if not keep:
        return np.zeros((0, X.shape[1]), dtype=int)
    X, predicted, bits = X[keep], np.asarray(predicted)[keep], np.asarray(bits)[keep]
    ranks = front_ranks(np.column_stack([predicted, bits]))
    order = np.lexsort((predicted, ranks))  # best first
    lo, hi = bits_range
    width = (hi - lo) / batch_size
    chosen: list[int] = []
    for t in list(targets)[: batch_size // 2]:
        for i in order:
            if t - width <= bits[i] <= t + 1e-9 and int(i) not in chosen:
                chosen.append(int(i))
                break
    n_bins = batch_size - len(chosen)
    edges = np.linspace(lo, hi, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, bits, side="right") - 1, 0, max(n_bins - 1, 0))
    for b in range(n_bins):
        for i in order:
            if bins[i] == b and int(i) not in chosen:
                chosen.append(int(i))
                break
    rest = [int(i) for i in order if int(i) not in set(chosen)]
    while len(chosen) < batch_size and rest:
        dist = [min(abs(bits[i] - bits[c]) for c in chosen) if chosen else 0.0 for i in rest]
        best = rest[int(np.argmax(dist))]
        chosen.append(best)
        rest.remove(best)
    return X[np.array(chosen, dtype=int)]


def round_robin(ranked: Sequence[np.ndarray], n: int, key: Callable[[np.ndarray], str], seen: Iterable[str] = ()) -> np.ndarray:
    """Up to `n` rows taken in turn from each list of `ranked` (best first within each), skipping
    keys in `seen` and repeats: every target gets a slot before any gets a second."""
    chosen: list[np.ndarray] = []
    taken = set(seen)
    pos = [0] * len(ranked)
    while len(chosen) < n and any(p < len(r) for p, r in zip(pos, ranked)):
        for t, rows in enumerate(ranked):
            while pos[t] < len(rows) and key(rows[pos[t]]) in taken:
                pos[t] += 1
            if pos[t] < len(rows) and len(chosen) < n:
                taken.add(key(rows[pos[t]]))
                chosen.append(rows[pos[t]])
                pos[t] += 1
    width = ranked[0].shape[1] if ranked else 0
    return np.stack(chosen).astype(int) if chosen else np.zeros((0, width), dtype=int)
