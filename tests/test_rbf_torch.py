"""The torch RBF interpolant is scipy's RBFInterpolator: same predictions, same degenerate cases."""

import numpy as np
import pytest
import torch
from scipy.interpolate import RBFInterpolator

from amq.errors import ConfigError
from amq.predictors.archive_data import load_archive
from amq.predictors.rbf import RBFPredictor, merge_duplicates
from amq.predictors.rbf_torch import KERNELS, TorchRBFInterpolant

RTOL = 1e-6
# scipy's note when a tail is below the kernel's order (the constant-tail cases below, on purpose)
pytestmark = pytest.mark.filterwarnings("ignore:`degree` should not be below")


def archive_like(n: int, genes: int, bits: tuple[int, ...] = (2, 3, 4), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Integer bit widths scaled to [0, 1] as SearchSpace.features does, and a JSD-like target:
    additive per-linear damage, much larger at the lowest width, plus a small interaction term."""
    rng = np.random.default_rng(seed)
    G = rng.integers(0, len(bits), size=(n, genes))
    damage = rng.lognormal(size=(genes, len(bits))) * np.logspace(0, -3, len(bits))
    jsd = 1e-3 * damage[np.arange(genes), G].sum(1) * (1 + 0.05 * np.sin(G[:, :3].sum(1)))
    b = np.asarray(bits, dtype=np.float64)
    return (b[G] - b[0]) / (b[-1] - b[0]), jsd


def assert_backends_agree(X, y, X_eval, **kw) -> np.ndarray:
    a = RBFPredictor(backend="scipy", **kw).fit(X, y).predict(X_eval)
    b = RBFPredictor(backend="torch", device="cpu", **kw).fit(X, y).predict(X_eval)
    np.testing.assert_allclose(b, a, rtol=RTOL)
    return b


@pytest.mark.parametrize(
    "n, genes, bits",
    [(400, 224, (2, 3, 4)), (300, 64, (3, 4, 8)), (60, 224, (2, 3, 4))],
    ids=["more-points-than-genes", "uneven-levels", "fewer-points-than-genes"],
)
def test_torch_matches_scipy_on_archive_like_data(n, genes, bits):
    X, y = archive_like(n + 150, genes, bits)
    pred = assert_backends_agree(X[:n], y[:n], X)
    np.testing.assert_allclose(pred[:n], y[:n], rtol=1e-6)  # interpolates the archive
    assert np.all(pred > 0)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("degree", [-1, 0, 1])
def test_interpolant_matches_scipy_for_every_kernel_and_degree(kernel, degree):
    X, y = archive_like(200, 40, seed=1)
    t = np.log(y)
    want = RBFInterpolator(X[:150], t[:150], kernel=kernel, degree=degree, smoothing=0.01)(X[150:])
    got = TorchRBFInterpolant(X[:150], t[:150], 0.01, kernel=kernel, degree=degree)(X[150:])
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-9)


def test_duplicates_are_merged_and_both_backends_agree():
    X, y = archive_like(350, 224, seed=2)
    Xd, yd = np.concatenate([X[:300], X[[3, 3, 17]]]), np.concatenate([y[:300], y[[3, 3, 17]] * [2.0, 3.0, 1.0]])
    Z, t, s = merge_duplicates(Xd, np.log(yd), 0.5)
    assert len(Z) == 300 and np.array_equal(Z, X[:300])  # first-seen order kept
    assert np.isclose(t[3], np.log(y[3]) + np.log(6) / 3) and np.isclose(t[17], np.log(y[17]))
    assert s[3] == 0.5 / 3 and s[17] == 0.25 and s[0] == 0.5
    pred = assert_backends_agree(Xd, yd, X)
    assert np.isclose(pred[3], np.exp(t[3]), rtol=1e-6)  # the duplicated point interpolates the mean log target


def test_smoothing_of_repeats_is_smoothing_over_multiplicity():
    """k repeats of a point with smoothing s give the interpolant of the merged point with s / k."""
    X, y = archive_like(120, 20, seed=3)
    t = np.log(y)
    Xd, td = np.concatenate([X, X[:10]]), np.concatenate([t, t[:10] + 0.1])
    Z, tm, s = merge_duplicates(Xd, td, 0.3)
    np.testing.assert_allclose(s[:10], 0.15)
    # scipy's own smoothed least-squares solution on the repeated rows is not singular
    # once smoothing > 0: it must equal the merged one.
    want = RBFInterpolator(Xd, td, kernel="cubic", degree=1, smoothing=0.3)(X)
    np.testing.assert_allclose(TorchRBFInterpolant(Z, tm, s)(X), want, rtol=1e-6, atol=1e-9)


def test_rank_deficient_tail_falls_back_to_smoothing_then_a_constant_tail():
    """More points than genes, but one gene never varies: the linear tail's column for it is all
    zero, so the system is singular with any smoothing; both backends end on a constant tail."""
    X, y = archive_like(120, 40, seed=6)
    X[:100, 7] = 0.5
    for exact in (lambda: TorchRBFInterpolant(X[:100], np.log(y[:100])), lambda: RBFInterpolator(X[:100], np.log(y[:100]), kernel="cubic")):
        with pytest.raises(np.linalg.LinAlgError):
            exact()
    pred = assert_backends_agree(X[:100], y[:100], X)
    want = RBFInterpolator(X[:100], np.log(y[:100] + 1e-8), kernel="cubic", degree=0, smoothing=1e-6)(X)
    np.testing.assert_allclose(pred, np.exp(want) - 1e-8, rtol=RTOL)


def test_neighbors_stays_with_scipy_and_matches_the_global_interpolant():
    X, y = archive_like(150, 30, seed=4)
    with pytest.raises(ConfigError, match=r"^neighbors: .*only with backend=scipy"):
        RBFPredictor(neighbors=20)
    local = RBFPredictor(backend="scipy", neighbors=100).fit(X[:100], y[:100]).predict(X[100:])
    glob = RBFPredictor(backend="torch", device="cpu").fit(X[:100], y[:100]).predict(X[100:])
    np.testing.assert_allclose(local, glob, rtol=RTOL)  # 100 neighbours of 100 points: the same interpolant


@pytest.mark.parametrize(
    "kw, argument",
    [
        ({"backend": "jax"}, "backend"),
        ({"kernel": "gaussian"}, "kernel"),
        ({"degree": 2}, "degree"),
        ({"smoothing": -1.0}, "smoothing"),
        ({"backend": "scipy", "device": "cuda"}, "device"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_bad_arguments_name_the_argument(kw, argument):
    with pytest.raises(ConfigError, match=rf"^{argument}: ") as info:
        RBFPredictor(**kw)
    assert info.value.argument == argument


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_without_a_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match="^device: "):
        RBFPredictor(device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_matches_scipy():
    X, y = archive_like(2000, 224, seed=5)
    a = RBFPredictor(backend="scipy").fit(X[:1500], y[:1500]).predict(X)
    p = RBFPredictor(backend="torch", device="cuda").fit(X[:1500], y[:1500])
    assert p.device.type == "cuda" and p._model.coeffs.is_cuda
    np.testing.assert_allclose(p.predict(X), a, rtol=RTOL)


@pytest.mark.slow
def test_backends_agree_on_a_real_archive(smoke_run):
    """The smoke search's own archive: real JSD of SmolLM2 configurations (fewer points than genes)."""
    data = load_archive(smoke_run[0])
    X, y = data.features(), data.metric
    assert len(X) >= 10 and np.all(y > 0)
    pred = assert_backends_agree(X[:-3], y[:-3], X)
    np.testing.assert_allclose(pred[:-3], y[:-3], rtol=1e-6)
