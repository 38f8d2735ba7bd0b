"""A predictor that learns only what the sensitivity table's additive model gets wrong.

On a small budget the predictor sees far fewer configurations than it has features (about 80
evaluations against 420 thermometer steps for SmolLM2 in {2, 3, 4}): from the evaluations alone
it cannot learn what each linear costs at each width, yet the sensitivity stage measured just
that. `TablePrior` puts the table under the predictor as its prior mean, in log space:

    log metric(x) ~ a + b * log P(x) + residual(x),    P(x) = baseline + sum over genes of damage(gene, width)

P is the table's additive model (its all-highest baseline plus each gene's measured damage at its
width: every width's own probes with `search.sensitivity_widths=all`, or their estimates with
`estimated`, the lowest width's scaled by 4 per bit otherwise, as the knapsack seeds assume). a and b >= 0 are fitted by least squares on
the training data; the wrapped predictor learns the residual (interactions, the table's probe
noise) and must fit its target as given (`predictor.target=none`). Log space because damage
compounds: over the whole bits range the metric spans orders of magnitude, and a straight line in
P fitted there goes negative near the targets. Where the wrapped predictor gives a std s of the
log, the prediction's is the delta method's exp(mean) * s.

Measured on SmolLM2 in {2, 3, 4} with KL (docs/benchmarks.md, "The sensitivity table as the
predictor's prior"): with a linear-kernel GP on the residual it ranks configurations of equal bits
a little better than the bare GP and predicts the metric closer, and the search it drives finds
lower calibration KL at nearly every target; on held-out text the gain is steady only at 4.0 bits,
so it is opt-in.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from amq.predictors.base import Predictor
from amq.search.seeding import additive_damage
from amq.search.space import SearchSpace

PRIORS = ("none", "table")

# predictor features (n, n_genes) -> the table's additive prediction of the metric (n,), > 0
TableModel = Callable[[np.ndarray], np.ndarray]


def table_model(space: SearchSpace, damage: Mapping[str, float], baseline: float, measured: Mapping[int, Mapping[str, float]] | None = None) -> TableModel:
    """P(x): `baseline` (the all-highest configuration's metric) plus each gene's damage at its width."""
    bits = space.bit_choices
    cost = additive_damage(space, damage, None, measured or None)  # [n_genes, n_choices], inf past sizes
    by_width = np.zeros((space.n_genes, len(bits)))
    for w, b in enumerate(bits):
        by_width[:, w] = np.where((space.choice_bits == b) & np.isfinite(cost), cost, 0.0).sum(axis=1)
    by_width -= by_width[:, -1:]  # damage is counted from the highest width (factors leave it a little)
    floor = max(float(baseline), 1e-12)
    lo, hi = bits[0], bits[-1]

    def predict(X: np.ndarray) -> np.ndarray:
        width = np.searchsorted(bits, np.rint(lo + np.atleast_2d(X) * (hi - lo)).astype(int))
        return floor + by_width[np.arange(space.n_genes)[None, :], width].sum(axis=1)

    return predict


class TablePrior:
    """`base` fitted on what `a + b log P(x)` leaves of log(metric) (see the module doc)."""

    def __init__(self, base: Predictor, model: TableModel) -> None:
        self.base, self.model = base, model
        self.name = f"{base.name}+table"
        self.coef = np.zeros(2)

    def _prior(self, X: np.ndarray, logp: np.ndarray | None = None) -> np.ndarray:
        return self.coef[0] + self.coef[1] * (np.log(self.model(X)) if logp is None else logp)

    def fit(self, X: np.ndarray, y: np.ndarray) -> "TablePrior":
        logy = np.log(np.maximum(np.asarray(y, dtype=np.float64), 1e-12))
        logp = np.log(self.model(X))
        self.coef = np.array([float(logy.mean()), 0.0])  # no prior: where P does not vary, or ranks backwards
        if np.ptp(logp) > 0:
            a, b = np.linalg.lstsq(np.column_stack([np.ones(len(logy)), logp]), logy, rcond=None)[0]
            if b >= 0:
                self.coef = np.array([a, b])
        self.base.fit(X, logy - self._prior(X, logp))
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.exp(self._prior(X) + self.base.predict(X))


class UncertainTablePrior(TablePrior):
    """`TablePrior` over a predictor with a predictive std (of the log: the delta method scales it)."""

    def predict_dist(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean, std = self.base.predict_dist(X)  # type: ignore[attr-defined]
        median = np.exp(self._prior(X) + mean)
        return median, np.maximum(median * std, 1e-300)


def with_prior(base: Predictor, model: TableModel) -> TablePrior:
    """`base` under the table's prior, keeping whether it gives a predictive std."""
    return UncertainTablePrior(base, model) if hasattr(base, "predict_dist") else TablePrior(base, model)
