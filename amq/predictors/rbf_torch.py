"""The RBF interpolant of `scipy.interpolate.RBFInterpolator`, in torch (BLAS threads or a GPU).

Why: scipy builds the n x n kernel matrix and evaluates predictions in single-threaded loops, so at
the `paper` budget's ~10,000 archived configurations x ~220 genes one fit takes about 30 s and the
NSGA-II run on the predictor about 8 s, 200 times per search. Here the pairwise distances are
matrix products (|x|^2 + |c|^2 - 2 x.c, clamped at 0), which run on all cores or on the GPU, and
the augmented system is solved in float64 by LU (`torch.linalg.solve`, as scipy's `dgesv`).

Same interpolant as scipy's (epsilon 1, the scale-invariant kernels):

    f(x) = sum_j a_j phi(|x - c_j|) + sum_k b_k p_k((x - shift) / scale)
    [K + diag(smoothing)  P] [a]   [t]
    [P^T                  0] [b] = [0]

with scipy's kernel signs (`cubic` is +r^3), its monomials of degree <= `degree` (here at most 1:
a constant and one linear term per gene), and its shifting and scaling of the polynomial's domain
to [-1, 1] per dimension (scale 1 where a dimension is constant).
"""

from __future__ import annotations

import numpy as np
import torch

# phi(r) from the squared distance (in place where possible), scipy's signs.
KERNELS = {
    "linear": lambda d2: d2.sqrt_().neg_(),
    "thin_plate_spline": lambda d2: torch.xlogy(d2, d2).mul_(0.5),  # r^2 log r, 0 at r = 0
    "cubic": lambda d2: d2.sqrt_().pow_(3),
    "quintic": lambda d2: d2.sqrt_().pow_(5).neg_(),
}
DEGREES = (-1, 0, 1)

# Elements of one block of the prediction's distance matrix (float64: 128 MiB).
_CHUNK_ELEMENTS = 1 << 24


def squared_distances(x: torch.Tensor, c: torch.Tensor, c_sq: torch.Tensor) -> torch.Tensor:
    """|x_i - c_j|^2 by a matrix product; `c_sq` is |c_j|^2. Clamped at 0 (rounding can go below)."""
    d2 = torch.addmm(c_sq.unsqueeze(0), x, c.T, beta=1.0, alpha=-2.0)
    return d2.add_((x * x).sum(1, keepdim=True)).clamp_(min=0.0)


class TorchRBFInterpolant:
    """Fit on construction (raises `numpy.linalg.LinAlgError` on a singular system, as scipy does);
    call with points to evaluate. Inputs and outputs are numpy float64; the work runs on `device`."""

    def __init__(
        self,
        centers: np.ndarray,
        values: np.ndarray,
        smoothing: float | np.ndarray = 0.0,
        kernel: str = "cubic",
        degree: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        if kernel not in KERNELS:
            raise ValueError(f"kernel {kernel!r}: one of {', '.join(KERNELS)}")
        if degree not in DEGREES:
            raise ValueError(f"degree {degree}: one of {DEGREES}")
        self.kernel, self.degree, self.device = kernel, degree, torch.device(device)
        c = torch.as_tensor(np.asarray(centers, dtype=np.float64), device=self.device)
        n, dim = c.shape
        n_mono = self._n_monomials(dim)
        if n_mono > n:
            raise ValueError(f"at least {n_mono} data points are required when degree is {degree} and the number of dimensions is {dim}")
        lo, hi = c.min(0).values, c.max(0).values
        self.shift = (hi + lo) / 2
        self.scale = torch.where(hi == lo, torch.ones_like(hi), (hi - lo) / 2)
        self.centers, self.centers_sq = c, (c * c).sum(1)

        lhs = torch.zeros(n + n_mono, n + n_mono, dtype=torch.float64, device=self.device)
        d2 = squared_distances(c, c, self.centers_sq)
        d2.diagonal().zero_()  # exactly 0 from a point to itself
        lhs[:n, :n] = KERNELS[kernel](d2)
        del d2
        lhs[:n, :n].diagonal().add_(torch.as_tensor(smoothing, dtype=torch.float64, device=self.device))
        poly = self._polynomial(c)
        lhs[:n, n:], lhs[n:, :n] = poly, poly.T
        rhs = torch.zeros(n + n_mono, dtype=torch.float64, device=self.device)
        rhs[:n] = torch.as_tensor(np.asarray(values, dtype=np.float64), device=self.device)
        coeffs, info = torch.linalg.solve_ex(lhs, rhs)
        if int(info) != 0 or not bool(torch.isfinite(coeffs).all()):
            raise np.linalg.LinAlgError("Singular matrix.")
        self.coeffs = coeffs

    def _n_monomials(self, dim: int) -> int:
        return {-1: 0, 0: 1, 1: dim + 1}[self.degree]

    def _polynomial(self, x: torch.Tensor) -> torch.Tensor:
        """scipy's monomials of the shifted and scaled domain: [1, x_1, ..., x_d] for degree 1."""
        ones = torch.ones(len(x), 1, dtype=torch.float64, device=self.device)
        if self.degree == -1:
            return ones[:, :0]
        return ones if self.degree == 0 else torch.cat([ones, (x - self.shift) / self.scale], 1)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        X = torch.as_tensor(np.asarray(x, dtype=np.float64), device=self.device)
        n = len(self.centers)
        a, b = self.coeffs[:n], self.coeffs[n:]
        out = torch.empty(len(X), dtype=torch.float64, device=self.device)
        step = max(1, _CHUNK_ELEMENTS // max(n, 1))
        for i in range(0, len(X), step):
            xs = X[i : i + step]
            phi = KERNELS[self.kernel](squared_distances(xs, self.centers, self.centers_sq))
            out[i : i + step] = phi @ a + self._polynomial(xs) @ b
        return out.cpu().numpy()
