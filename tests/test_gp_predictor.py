"""The GP predictor ranks unseen configurations, knows where it is unsure, and is scored honestly."""

import json

import numpy as np
import pytest
from scipy.stats import kendalltau

from amq.errors import ConfigError
from amq.predictors.accuracy import heldout_scores
from amq.predictors.archive_data import load_archive
from amq.predictors.base import Predictor, UncertainPredictor
from amq.predictors.gp import GPPredictor
from amq.predictors.rbf import RBFPredictor

LEVELS = np.array([0.0, 0.2, 1.0])  # {3, 4, 8} bits scaled to [0, 1], as the embedded model's space


def _synthetic(n: int, genes: int = 30, seed: int = 0):
    """An additive per-gene damage model (low bits hurt most), JSD-like magnitudes."""
    rng = np.random.default_rng(seed)
    w = rng.lognormal(size=(genes, 3)) * np.array([1.0, 0.1, 0.001]) * 1e-3
    G = rng.integers(0, 3, size=(n, genes))
    return LEVELS[G], w[np.arange(genes), G].sum(1)


def _fast_gp(**kw) -> GPPredictor:
    return GPPredictor(iterations=60, **kw)


def test_gp_ranks_held_out_synthetic_configs():
    X, y = _synthetic(160)
    p = _fast_gp().fit(X[:120], y[:120])
    assert isinstance(p, Predictor) and isinstance(p, UncertainPredictor)
    pred = p.predict(X[120:])
    assert pred.shape == (40,) and np.isfinite(pred).all()
    assert kendalltau(pred, y[120:]).statistic > 0.6


def test_gp_std_is_positive_and_shrinks_near_training_points():
    """The same configurations are less uncertain once they (and nothing else new) are in the training set."""
    X, y = _synthetic(100)
    before = _fast_gp().fit(X[:60], y[:60])
    after = _fast_gp().fit(X, y)
    _, s0 = before.predict_dist(X[60:])
    _, s1 = after.predict_dist(X[60:])
    assert (s0 > 0).all() and (s1 > 0).all()
    assert np.median(s1 / s0) < 0.8
    assert np.mean(s1 < s0) > 0.8


def test_gp_log_target_std_is_positive_in_metric_units():
    """With the log target the std comes back through the delta method: positive, scaled like the metric."""
    X, y = _synthetic(80)
    p = _fast_gp(target="log").fit(X[:60], y[:60])
    mean, std = p.predict_dist(X[60:])
    assert (mean > 0).all() and (std > 0).all()
    assert np.allclose(p.predict(X[60:]), mean)
    assert kendalltau(mean, y[60:]).statistic > 0.5


def test_gp_on_a_real_looking_archive(tmp_path):
    """archive.jsonl lines as a run writes them (per-module bits), read back through the loader."""
    rng = np.random.default_rng(1)
    modules = [f"model.layers.{b}.{r}" for b in range(6) for r in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]
    damage = {m: {3: rng.lognormal(-5, 1), 4: rng.lognormal(-7, 1), 8: 1e-6} for m in modules}
    lines = []
    for i in range(90):
        bits = {m: int(rng.choice([3, 4, 8])) for m in modules}
        jsd = sum(damage[m][b] for m, b in bits.items()) * (1 + 0.02 * rng.standard_normal())
        lines.append(json.dumps({"iteration": i // 30, "genes": [], "metrics": {"jsd": jsd}, "config": {"version": 1, "group_size": 64, "bits": bits}}))
    lines.append(lines[3])  # written twice (a resume): counts once
    (tmp_path / "archive.jsonl").write_text("\n".join(lines) + "\n")
    data = load_archive(tmp_path)
    assert len(data.metric) == 90 and data.bits.shape == (90, len(modules))
    X = data.features()
    assert set(np.unique(X)) <= {0.0, 0.2, 1.0}
    p = _fast_gp().fit(X[:60], data.metric[:60])
    s = heldout_scores(p.predict(X[60:]), data.metric[60:])
    assert s["predictor/kendall_tau_all_bits"] > 0.6, s


def test_heldout_scores_differ_from_in_sample():
    """An interpolating RBF is perfect on its own training points; the held-out score must not be."""
    X, y = _synthetic(120, genes=40, seed=2)
    rbf = RBFPredictor().fit(X[:60], y[:60])
    in_sample = heldout_scores(rbf.predict(X[:60]), y[:60])
    held_out = heldout_scores(rbf.predict(X[60:]), y[60:])
    assert in_sample["predictor/kendall_tau_all_bits"] == pytest.approx(1.0)
    assert held_out["predictor/kendall_tau_all_bits"] < 0.95
    assert held_out["predictor/rmse"] > 10 * in_sample["predictor/rmse"]
    assert held_out["predictor/n_heldout"] == 60


def test_gp_is_deterministic_for_a_seed():
    X, y = _synthetic(60)
    a = _fast_gp(seed=3).fit(X, y).predict_dist(X[:5])
    b = _fast_gp(seed=3).fit(X, y).predict_dist(X[:5])
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_gp_sparse_variational_path_fits():
    """The path used above max_exact points (the paper budget's archive size)."""
    X, y = _synthetic(300)
    p = GPPredictor(method="auto", max_exact=100, n_inducing=64, svgp_steps=200, svgp_batch_size=128).fit(X[:250], y[:250])
    assert p.used_method == "svgp"
    mean, std = p.predict_dist(X[250:])
    assert (std > 0).all()
    assert kendalltau(mean, y[250:]).statistic > 0.5


@pytest.mark.parametrize("argument, value", [("kernel", "cosine"), ("encoding", "onehot"), ("method", "kiss"), ("target", "sqrt")])
def test_gp_rejects_bad_arguments(argument, value):
    with pytest.raises(ConfigError, match=f"^{argument}: ") as info:
        GPPredictor(**{argument: value})
    assert info.value.argument == argument


def test_gp_config_composes_and_fits(compose_cfg):
    """`predictor=gp` from the real conf/ instantiates to an uncertain predictor that fits."""
    from hydra.utils import instantiate

    make = instantiate(compose_cfg(["predictor=gp", "predictor.iterations=30"]).predictor)
    X, y = _synthetic(40)
    p = make(seed=0).fit(X, y)
    assert isinstance(p, UncertainPredictor) and p.name == "gp"
    assert p.predict(X).shape == (40,)


def test_a_bits_only_predictor_ranks_a_spread_batch_but_not_configurations_at_equal_bits():
    """The overall tau rewards knowing that fewer bits hurt; the within-bits tau does not."""
    rng = np.random.default_rng(0)
    bits = np.repeat([3.0, 3.5, 4.0, 4.5], 10) + rng.uniform(0, 0.2, 40)
    interaction = rng.normal(0, 1, 40)  # what separates configurations of equal bits
    actual = np.exp(-bits) * (1 + 0.3 * interaction)
    bits_only = np.exp(-np.floor(bits * 4) / 4)  # constant within each 0.25-bit bin
    s = heldout_scores(bits_only, actual, bits, targets=[3.5, 4.0])
    assert s["predictor/kendall_tau_all_bits"] > 0.6
    assert s["predictor/kendall_tau_within_bits"] == pytest.approx(0.0)
    assert s["predictor/pairs_within_bits"] > 0
    informed = heldout_scores(np.exp(-bits) * (1 + 0.3 * interaction + 0.05 * rng.normal(0, 1, 40)), actual, bits, targets=[3.5, 4.0])
    assert informed["predictor/kendall_tau_within_bits"] > 0.7
    assert informed["predictor/rel_error_near_targets"] < s["predictor/rel_error_near_targets"]
