"""Predictors fit and rank real structure: an additive per-gene damage model, and a real archive."""

import numpy as np
import pytest
from scipy.stats import kendalltau

from amq.errors import ConfigError
from amq.predictors.base import Predictor, TargetTransform
from amq.predictors.mlp import MLPPredictor
from amq.predictors.rbf import RBFPredictor


def _synthetic(n: int, genes: int = 30, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = rng.lognormal(size=(genes, 3)) * np.array([1.0, 0.1, 0.001])  # low bits hurt most
    X = rng.integers(0, 3, size=(n, genes))
    y = w[np.arange(genes), X].sum(1)
    return X, y


@pytest.mark.parametrize(
    "make, min_tau",
    [(lambda: RBFPredictor(), 0.6), (lambda: MLPPredictor(epochs=150, hidden=64), 0.4)],
    ids=["rbf", "mlp"],
)
def test_predictor_ranks_held_out_configs(make, min_tau):
    X, y = _synthetic(260)
    p = make().fit(X[:200] / 2, y[:200])
    assert isinstance(p, Predictor)
    pred = p.predict(X[200:] / 2)
    assert pred.shape == (60,)
    tau = kendalltau(pred, y[200:]).statistic
    assert tau > min_tau, tau


def test_rbf_interpolates_training_points():
    X, y = _synthetic(80)
    p = RBFPredictor().fit(X, y)
    assert np.allclose(p.predict(X), y, rtol=1e-3)


def test_rbf_with_fewer_points_than_genes():
    X, y = _synthetic(10, genes=40)
    assert np.isfinite(RBFPredictor().fit(X, y).predict(X)).all()


def test_mlp_is_deterministic_for_a_seed():
    X, y = _synthetic(100)
    a = MLPPredictor(epochs=20, hidden=32, seed=3).fit(X, y).predict(X[:5])
    b = MLPPredictor(epochs=20, hidden=32, seed=3).fit(X, y).predict(X[:5])
    assert np.array_equal(a, b)


def test_encoding_log_roundtrip_and_bad_target():
    e = TargetTransform("log")
    y = np.array([1e-4, 0.3, 2.0])
    assert np.allclose(e.inverse(e.forward(y)), y)
    with pytest.raises(ConfigError, match="^target: "):
        TargetTransform("sqrt")
