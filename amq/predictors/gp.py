"""Gaussian-process predictor (gpytorch) with a predictive standard deviation.

Why these choices (measured on real archives of the embedded model, docs/predictors.md):
- Genes are ordinal with few levels ({3, 4, 8} bits scaled to {0, 0.2, 1}). The default
  `thermometer` encoding turns each gene into one indicator per step up ("at least 4 bits",
  "at least 8 bits"), so the kernel learns how much each step of each gene matters instead of
  assuming the scaled distance 4 -> 8 is four times 3 -> 4.
- JSD is close to additive over linears, so the kernel is a linear part (an additive per-step
  damage model) plus an ARD-RBF part for interactions, fitted on the raw metric by default:
  log(sum of damages) is not additive, and the log target ranked worse.
- Observation noise is learned (a Gaussian likelihood): the true metric is deterministic, but the
  model is not exact and the fitted noise absorbs the misfit instead of forcing interpolation.
- Scale: an exact GP (Cholesky) up to `max_exact` points; above that a sparse variational GP
  (SVGP, `n_inducing` learned inducing points, minibatch ELBO for `svgp_steps` steps), whose cost
  does not grow with the archive, so the `paper` budget's ~10,000 points x ~220 genes stay usable
  on CPU.

Uncertainty: `predict_dist` returns the posterior mean and the std of the latent function (not
including the fitted noise), in metric units: that std is what shrinks near evaluated
configurations, which is what an optimistic bound (mean - kappa x std) should reward. With
`target=log` the latent posterior is N(m, s^2) over log(metric + eps); `predict` then returns the
lognormal median exp(m) - eps (it ranks like m) and the std is the delta method's exp(m) * s.
"""

from __future__ import annotations

import logging
import math
import time
import warnings

import gpytorch
import numpy as np
import torch

from amq.devices import resolve_device
from amq.errors import InvalidArgument
from amq.predictors.base import TargetTransform

log = logging.getLogger(__name__)

ENCODINGS = ("scaled", "thermometer")
KERNELS = ("rbf", "matern", "linear", "linear+rbf", "linear+matern")
METHODS = ("auto", "exact", "svgp")


class _Encoder:
    """Feature encoding of the [0, 1]-scaled genes, learned from the training matrix's levels."""

    def __init__(self, encoding: str) -> None:
        if encoding not in ENCODINGS:
            raise InvalidArgument("encoding", f"{encoding!r}", ", ".join(ENCODINGS))
        self.encoding = encoding
        self.levels: np.ndarray | None = None

    def fit(self, X: np.ndarray) -> _Encoder:
        # Steps: every distinct value above the lowest, shared by all genes (a gene that cannot
        # reach a level simply never sets that indicator).
        self.levels = np.unique(np.round(X, 6))[1:]
        return self

    def __call__(self, X: np.ndarray) -> np.ndarray:
        if self.encoding == "scaled" or self.levels is None or len(self.levels) == 0:
            return X
        return np.concatenate([(X >= lv - 1e-6).astype(np.float64) for lv in self.levels], axis=1)


def _kernel(kind: str, d: int) -> gpytorch.kernels.Kernel:
    if kind not in KERNELS:
        raise InvalidArgument("kernel", f"{kind!r}", ", ".join(KERNELS))
    parts: list[gpytorch.kernels.Kernel] = []
    if kind.startswith("linear"):
        parts.append(gpytorch.kernels.LinearKernel())
    stationary = kind.split("+")[-1]
    if stationary in ("rbf", "matern"):
        base = gpytorch.kernels.RBFKernel(ard_num_dims=d) if stationary == "rbf" else gpytorch.kernels.MaternKernel(nu=2.5, ard_num_dims=d)
        # Start with lengthscales of the order of the typical distance between configurations.
        base.lengthscale = torch.full((1, d), math.sqrt(d) / 2.0)
        parts.append(gpytorch.kernels.ScaleKernel(base))
    kern = parts[0] if len(parts) == 1 else gpytorch.kernels.AdditiveKernel(*parts)
    return kern.double()


class _ExactGP(gpytorch.models.ExactGP):
    def __init__(self, X: torch.Tensor, y: torch.Tensor, likelihood: gpytorch.likelihoods.Likelihood, kernel: gpytorch.kernels.Kernel) -> None:
        super().__init__(X, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = kernel

    def forward(self, x: torch.Tensor) -> gpytorch.distributions.MultivariateNormal:
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


class _SVGP(gpytorch.models.ApproximateGP):
    def __init__(self, inducing: torch.Tensor, kernel: gpytorch.kernels.Kernel) -> None:
        dist = gpytorch.variational.NaturalVariationalDistribution(inducing.size(0))
        strategy = gpytorch.variational.VariationalStrategy(self, inducing, dist, learn_inducing_locations=True)
        super().__init__(strategy)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = kernel

    def forward(self, x: torch.Tensor) -> gpytorch.distributions.MultivariateNormal:
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


class GPPredictor:
    """A GP on (encoded genes) -> transformed metric; exact when small, SVGP when large."""

    name = "gp"

    def __init__(
        self,
        kernel: str = "linear+rbf",
        encoding: str = "thermometer",
        method: str = "auto",
        max_exact: int = 2000,
        n_inducing: int = 512,
        iterations: int = 150,
        lr: float = 0.1,
        svgp_steps: int = 600,
        ngd_lr: float = 0.1,
        svgp_batch_size: int = 512,
        noise_floor: float = 1e-4,
        device: str = "cpu",
        target: str = "none",
        seed: int = 0,
    ) -> None:
        if method not in METHODS:
            raise InvalidArgument("method", f"{method!r}", ", ".join(METHODS))
        _kernel(kernel, 1)  # validate the name early
        self.transform = TargetTransform(target)
        self.encoder = _Encoder(encoding)
        self.kernel, self.method, self.max_exact, self.n_inducing = kernel, method, max_exact, n_inducing
        self.iterations, self.lr, self.svgp_steps, self.svgp_batch_size = iterations, lr, svgp_steps, svgp_batch_size
        self.ngd_lr = ngd_lr
        self.noise_floor, self.seed, self.device = noise_floor, seed, resolve_device(device)
        self._model: gpytorch.models.GP | None = None
        self._likelihood: gpytorch.likelihoods.GaussianLikelihood | None = None
        self._mu, self._sd = 0.0, 1.0
        self.fit_seconds = 0.0
        self.used_method = ""

    # -------------------------------------------------------------- fitting
    def fit(self, X: np.ndarray, y: np.ndarray) -> GPPredictor:
        t0 = time.perf_counter()
        torch.manual_seed(self.seed)
        X = np.atleast_2d(np.asarray(X, dtype=np.float64))
        Z = self.encoder.fit(X)(X)
        t = self.transform.forward(y)
        self._mu, self._sd = float(t.mean()), float(t.std() or 1.0)
        Xt = torch.tensor(Z, dtype=torch.float64, device=self.device)
        yt = torch.tensor((t - self._mu) / self._sd, dtype=torch.float64, device=self.device)
        likelihood = gpytorch.likelihoods.GaussianLikelihood(noise_constraint=gpytorch.constraints.GreaterThan(self.noise_floor)).double().to(self.device)
        kernel = _kernel(self.kernel, Z.shape[1]).to(self.device)
        exact = self.method == "exact" or (self.method == "auto" and len(Z) <= self.max_exact)
        if exact:
            model = self._fit_exact(Xt, yt, likelihood, kernel)
        else:
            model = self._fit_svgp(Xt, yt, likelihood, kernel)
        model.eval()
        likelihood.eval()
        self._model, self._likelihood = model, likelihood
        self.used_method = "exact" if exact else "svgp"
        self.fit_seconds = time.perf_counter() - t0
        log.debug(
            "gp (%s, %s, %s): %d points x %d features, noise %.3g, %.2fs",
            self.used_method,
            self.kernel,
            self.encoder.encoding,
            len(Z),
            Z.shape[1],
            float(likelihood.noise.detach()),
            self.fit_seconds,
        )
        return self

    def _fit_exact(self, X: torch.Tensor, y: torch.Tensor, likelihood, kernel) -> gpytorch.models.GP:
        model = _ExactGP(X, y, likelihood, kernel).double().to(self.device)
        model.train()
        likelihood.train()
        opt = torch.optim.Adam(model.parameters(), lr=self.lr)
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
        # Cholesky (not CG/Lanczos) keeps the fit exact and deterministic at these sizes.
        with gpytorch.settings.max_cholesky_size(10**9), gpytorch.settings.cholesky_jitter(1e-6):
            for _ in range(self.iterations):
                opt.zero_grad()
                loss = -mll(model(X), y)
                loss.backward()
                opt.step()
        return model

    def _fit_svgp(self, X: torch.Tensor, y: torch.Tensor, likelihood, kernel) -> gpytorch.models.GP:
        gen = torch.Generator().manual_seed(self.seed)
        m = min(self.n_inducing, len(X))
        inducing = X[torch.randperm(len(X), generator=gen)[:m].to(self.device)].clone()
        model = _SVGP(inducing, kernel).double().to(self.device)
        model.train()
        likelihood.train()
        # Natural gradients for the variational distribution (converges in few steps, so the
        # predictive std is not left at its prior-like initial value), Adam for the rest.
        ngd = gpytorch.optim.NGD(model.variational_parameters(), num_data=len(X), lr=self.ngd_lr)
        opt = torch.optim.Adam([*model.hyperparameters(), *likelihood.parameters()], lr=self.lr)
        mll = gpytorch.mlls.VariationalELBO(likelihood, model, num_data=len(X))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.svgp_steps)
        bs = min(self.svgp_batch_size, len(X))
        perm, pos = torch.randperm(len(X), generator=gen), 0
        for _ in range(self.svgp_steps):
            if pos + bs > len(X):  # a new epoch: reshuffle
                perm, pos = torch.randperm(len(X), generator=gen), 0
            idx = perm[pos : pos + bs].to(self.device)
            pos += bs
            ngd.zero_grad()
            opt.zero_grad()
            loss = -mll(model(X[idx]), y[idx])
            loss.backward()
            ngd.step()
            opt.step()
            sched.step()
        return model

    # -------------------------------------------------------------- prediction
    def _latent(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and std of the latent function, in transformed-target units."""
        if self._model is None:
            raise RuntimeError("GPPredictor.predict called before fit")
        Z = torch.tensor(self.encoder(np.atleast_2d(np.asarray(X, dtype=np.float64))), dtype=torch.float64, device=self.device)
        means, stds = [], []
        with torch.no_grad(), gpytorch.settings.max_cholesky_size(10**9), warnings.catch_warnings():
            # Predicting at training points is legitimate here (e.g. the archive's own front).
            warnings.simplefilter("ignore", gpytorch.utils.warnings.GPInputWarning)
            for s in range(0, len(Z), 4096):
                f = self._model(Z[s : s + 4096])
                means.append(f.mean.cpu().numpy())
                stds.append(f.variance.clamp_min(1e-12).sqrt().cpu().numpy())
        mean = np.concatenate(means) * self._sd + self._mu
        std = np.concatenate(stds) * self._sd
        return mean.astype(np.float64), std.astype(np.float64)

    def predict(self, X: np.ndarray) -> np.ndarray:
        mean, _ = self._latent(X)
        return self.transform.inverse(mean)

    def predict_dist(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(median, std) in metric units; with the log target std is the delta method's exp(m) * s."""
        mean, std = self._latent(X)
        if self.transform.target == "log":
            med = np.exp(mean)
            return med - self.transform.eps, np.maximum(med * std, 1e-300)
        return mean, np.maximum(std, 1e-300)
