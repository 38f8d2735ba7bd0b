"""Choose which predicted candidates get a true evaluation: unseen, good, and spread along the bits axis."""

from __future__ import annotations

import numpy as np

from amq.search.pareto import front_ranks


def select_batch(
    X: np.ndarray, predicted: np.ndarray, bits: np.ndarray, seen: set[str], key, batch_size: int, bits_range: tuple[float, float]
) -> np.ndarray:
    """Pick up to `batch_size` rows of X.

    The bits range is cut into `batch_size` equal bins; each bin contributes its best candidate
    (lowest non-dominated rank, then lowest predicted metric). Bins left empty are filled with the
    remaining candidates farthest (in bits) from those already chosen, best rank first.
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
    edges = np.linspace(lo, hi, batch_size + 1)
    bins = np.clip(np.searchsorted(edges, bits, side="right") - 1, 0, batch_size - 1)
    chosen: list[int] = []
    for b in range(batch_size):
        for i in order:
            if bins[i] == b:
                chosen.append(int(i))
                break
    rest = [int(i) for i in order if int(i) not in set(chosen)]
    while len(chosen) < batch_size and rest:
        dist = [min(abs(bits[i] - bits[c]) for c in chosen) if chosen else 0.0 for i in rest]
        best = rest[int(np.argmax(dist))]
        chosen.append(best)
        rest.remove(best)
    return X[np.array(chosen, dtype=int)]
