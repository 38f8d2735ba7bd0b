"""A predictor that learns only what the sensitivity table's additive model gets wrong.

On a small budget the predictor sees far fewer configurations than it has features (about 80
evaluations against 420 thermometer steps for SmolLM2 in {2, 3, 4}): from the evaluations alone
it cannot learn what each linear costs at each width, yet the sensitivity stage measured just
that. `TablePrior` puts the table under the predictor as its prior mean:

    metric(x) ~ a + sum_w b_w * D_w(x) + residual(x)

where D_w(x) is the table's damage of the genes that configuration x holds at width w, for each
width below the highest (every width's own probes with `search.sensitivity_widths=all`; the
lowest width's otherwise, so that b_w learns the width factor the table lacks, relative to the
highest width's, which a absorbs). a and b_w >= 0 are fitted by least squares on the training
data, and the wrapped predictor (the GP by default) learns the residual: interactions and the
table's probe noise. Its predictive std, where it gives one, is the residual's.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
from scipy.optimize import lsq_linear

from amq.predictors.base import Predictor
from amq.search.seeding import additive_damage
from amq.search.space import SearchSpace

PRIORS = ("none", "table")

# features (n, n_genes) -> damage sums per width below the highest (n, n_widths - 1)
DamageFeatures = Callable[[np.ndarray], np.ndarray]


def damage_features(space: SearchSpace, damage: Mapping[str, float], measured: Mapping[int, Mapping[str, float]] | None = None) -> DamageFeatures:
    """The table's damage of a configuration, summed per width, from its predictor features.

    With `measured` (damage probed at the middle widths) each width's damage is its own probes';
    without, every width carries the lowest width's damage and the fitted coefficient per width
    stands for the width factor."""
    bits = space.bit_choices
    factors = None if measured else np.ones(len(bits))
    cost = additive_damage(space, damage, factors, measured)  # [n_genes, n_choices], inf past sizes
    # The highest width is left out: without middle-width probes every width carries the lowest
    # width's damage, so the columns of all widths sum to a constant, collinear with a.
    by_width = np.zeros((space.n_genes, len(bits) - 1))
    for w, b in enumerate(bits[:-1]):
        hit = space.choice_bits == b
        by_width[:, w] = np.where(hit & np.isfinite(cost), cost, 0.0).sum(axis=1)
    lo, hi = bits[0], bits[-1]

    def features(X: np.ndarray) -> np.ndarray:
        gene_bits = np.rint(lo + np.atleast_2d(X) * (hi - lo)).astype(int)
        width = np.searchsorted(bits, gene_bits)
        out = np.zeros((len(gene_bits), len(bits) - 1))
        for w in range(len(bits) - 1):
            out[:, w] = (width == w).astype(float) @ by_width[:, w]
        return out

    return features


class TablePrior:
    """`base` fitted on what `a + sum_w b_w * D_w(x)` leaves of the metric (see the module doc)."""

    def __init__(self, base: Predictor, features: DamageFeatures) -> None:
        self.base, self.features = base, features
        self.name = f"{base.name}+table"
        self.coef = np.zeros(0)

    def _prior(self, X: np.ndarray) -> np.ndarray:
        D = self.features(X)
        return self.coef[0] + D @ self.coef[1:]

    def fit(self, X: np.ndarray, y: np.ndarray) -> "TablePrior":
        y = np.asarray(y, dtype=np.float64)
        D = self.features(X)
        scale = np.maximum(np.abs(D).max(axis=0), 1e-300)  # columns of very different sizes: solve on [0, 1]
        A = np.column_stack([np.ones(len(y)), D / scale])
        lower = np.r_[-np.inf, np.zeros(D.shape[1])]
        sol = lsq_linear(A, y, bounds=(lower, np.full(A.shape[1], np.inf))).x
        self.coef = np.r_[sol[0], sol[1:] / scale]
        self.base.fit(X, y - self._prior(X))
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.base.predict(X) + self._prior(X)


class UncertainTablePrior(TablePrior):
    """`TablePrior` over a predictor with a predictive std (the residual's std is the prediction's)."""

    def predict_dist(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean, std = self.base.predict_dist(X)  # type: ignore[attr-defined]
        return mean + self._prior(X), std


def with_prior(base: Predictor, features: DamageFeatures) -> TablePrior:
    """`base` under the table's prior, keeping whether it gives a predictive std."""
    return UncertainTablePrior(base, features) if hasattr(base, "predict_dist") else TablePrior(base, features)
