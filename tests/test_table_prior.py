"""The sensitivity table as the predictor's prior (`search.predictor_prior=table`): the fitted
prior recovers a power of the additive model, the wrapped predictor learns only the rest (and ranks better
than the bare GP where the metric is not additive), and on the real SmolLM2 a search runs with it."""

import numpy as np
import pytest
from conftest import SMOKE, search_in_process

from amq.modeling.discovery import LinearInfo
from amq.predictors.gp import GPPredictor
from amq.predictors.table_prior import TablePrior, UncertainTablePrior, table_model, with_prior
from amq.search.space import SearchSpace


def _space():
    lin = [LinearInfo(f"model.layers.{b}.l{i}", b, f"l{i}", 64, 64 * (1 + i % 3)) for b in range(8) for i in range(6)]
    rng = np.random.default_rng(0)
    low = {li.name: float(d) for li, d in zip(lin, rng.lognormal(-5, 1.5, len(lin)))}
    mid = {3: {n: d / 3.7 for n, d in low.items()}}  # damage probed at the middle width
    return SearchSpace(lin, [2, 3, 4], 64), low, mid


def _metric(space, low, mid, genes, interaction=0.0):
    """The table's additive model (base 0.01) raised to a power, plus an optional pairwise term."""
    gb = space.gene_bits(genes)
    d2 = np.array([sum(low[n] for n in g) for g in space.groups])
    d3 = np.array([sum(mid[3][n] for n in g) for g in space.groups])
    additive = 0.01 + ((gb == 2) * d2 + (gb == 3) * d3).sum(1)
    return 1.7 * additive**1.2 + interaction * additive**2


def _tau(a, b):
    s = np.sign(a[:, None] - a[None, :]) * np.sign(b[:, None] - b[None, :])
    return s[np.triu_indices(len(a), 1)].mean()


def test_prior_recovers_a_power_of_the_additive_model_from_few_points():
    space, low, mid = _space()
    rng = np.random.default_rng(1)
    train, test = space.random(rng, 12), space.random(rng, 200)
    model = table_model(space, low, 0.01, mid)
    np.testing.assert_allclose(model(space.features(space.uniform(4))), 0.01)  # all-highest: the baseline
    fitted = TablePrior(GPPredictor(kernel="linear", iterations=30), model).fit(space.features(train), _metric(space, low, mid, train))
    np.testing.assert_allclose(fitted.coef, [np.log(1.7), 1.2], rtol=1e-6)
    np.testing.assert_allclose(fitted.predict(space.features(test)), _metric(space, low, mid, test), rtol=1e-3)


def test_lowest_width_table_under_interactions_ranks_better_than_the_bare_gp():
    space, low, mid = _space()
    rng = np.random.default_rng(2)
    train, test = space.random(rng, 20), space.random(rng, 300)
    y, truth = _metric(space, low, mid, train, 5.0), _metric(space, low, mid, test, 5.0)
    X, Xt = space.features(train), space.features(test)
    bare = GPPredictor(iterations=60).fit(X, y).predict(Xt)
    prior = with_prior(GPPredictor(kernel="linear", iterations=60), table_model(space, low, 0.01)).fit(X, y)  # no middle-width probes
    assert isinstance(prior, UncertainTablePrior)
    mean, std = prior.predict_dist(Xt)
    assert np.all(std > 0) and np.allclose(mean, prior.predict(Xt)) and np.all(mean > 0)
    assert _tau(mean, truth) > _tau(bare, truth) + 0.1
    assert _tau(mean, truth) > 0.9


def test_a_predictor_without_a_std_keeps_none():
    space, low, mid = _space()

    class Mean:
        name = "mean"

        def fit(self, X, y):
            self.m = float(np.mean(y))
            return self

        def predict(self, X):
            return np.full(len(X), self.m)

    wrapped = with_prior(Mean(), table_model(space, low, 0.01, mid))
    assert not hasattr(wrapped, "predict_dist") and wrapped.name == "mean+table"


@pytest.mark.slow
def test_search_with_the_table_prior_on_smollm2(tmp_path):
    """The real pipeline: every iteration's predictor sits on the run's own table, whose fitted
    prior alone already ranks the archive (the table measures the same metric on the same model)."""
    summary, objects = search_in_process([*SMOKE, "seed=3", "budget.iterations=1", "search.predictor_prior=table"], tmp_path / "run")
    predictor = objects.search.make_predictor(0)
    assert isinstance(predictor, UncertainTablePrior) and predictor.name == "gp+table"
    X = objects.space.features(np.array([r.genes for r in objects.archive.records]))
    y = np.array([r.metric for r in objects.archive.records])
    predictor.fit(X, y)
    assert predictor.coef[1] > 0
    assert np.corrcoef(predictor._prior(X), np.log(y))[0, 1] > 0.9
    assert "+ table prior" in objects.plan.predictor_name
    assert summary["final_hypervolume"] > 0
