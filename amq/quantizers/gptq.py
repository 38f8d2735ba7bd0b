"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"), implemented in torch from the paper.

Each linear is quantized one input column at a time; the rounding error of a column is spread
over the columns not yet quantized through the inverse Hessian H^-1 of the layer's squared output
error (H = 2 X X^T on the calibration inputs), computed once by a Cholesky factorisation.
Columns are processed in blocks with lazy batch updates; a group's min-max scale and zero are
fixed when the column block holding the group's first column comes up (from the weights as
updated by the earlier blocks, as in the reference), and `act_order` visits columns by
decreasing Hessian diagonal while groups stay contiguous in the original order (so the packed
format needs no column permutation). With `clip_search` a group's range is not plain min-max but
the narrowing, among `clip_grid` factors from 1.0 down to `clip_max_shrink`, with the least
sum_j c_j |w_j - q(w_j)|^clip_norm per row (`amq.quantizers.grid.ClipSearch`). c_j = 1 is the
reference's `mse` option; with `clip_weighted`, c_j = 1 / [H_F^-1]_jj (F: the columns not yet
quantized when j is; the squared diagonal of GPTQ's Cholesky factor), the loss GPTQ's Optimal
Brain Surgeon step incurs per squared rounding error of column j, so that columns whose errors
GPTQ cannot compensate count more.
Blocks are walked in order and each block sees the quantized outputs of the previous one
(`amq.quantizers.calibration`).

Why not a library: on this stack (CPU, torch 2.13, transformers 5.23) none installs and runs.
llm-compressor 0.14 pins transformers <= 5.17; gptqmodel 7.x needs torch >= 2.14.1 and is a
source build with compiled kernels (older releases fail to build their metadata here); auto-gptq
0.7.1 (archived) fails to import under transformers 5 (`no_init_weights` is gone). None of them
packs 3-bit layers in a mixed per-layer configuration in a format we can reload without their
kernels either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from amq.errors import InvalidArgument
from amq.modeling.discovery import ModelLayout
from amq.quantizers.calibration import InputStats, quantize_calibrated
from amq.quantizers.grid import ClipSearch, GridForm, minmax_grid
from amq.quantizers.packed import GroupQuant


@dataclass(frozen=True)
class GPTQFinalizer:
    """GPTQ with per-layer bits; `damp` is the dampening as a fraction of the mean Hessian diagonal.

    `clip_search` picks each group's range among `clip_grid` factors of its min-max range, evenly
    spaced from 1.0 down to `clip_max_shrink`, by the least sum_j c_j |w_j - q(w_j)|^clip_norm per
    row. The reference's `mse` option (grid 100, maxshrink 0.8, norm 2.4, c_j = 1) tries the
    factors 1.00, 0.99, ..., 0.21: here `clip_grid=81, clip_max_shrink=0.2, clip_norm=2.4,
    clip_weighted=false`. `clip_weighted` sets c_j to GPTQ's loss per squared rounding error of
    column j (see the module docstring), so with `clip_norm=2` (the default) a factor is scored by
    the loss GPTQ's own update rule assigns its rounding errors. The defaults measured best of
    min-max, the reference's search and this one on SmolLM2 (docs/benchmarks.md, "Final
    quantizers"). `integer_zero` rounds each group's zero point to a whole code before GPTQ
    rounds its weights (the reference's grid), so the compressed-tensors export bit-packs every
    layer (`pack-quantized`, what vLLM serves) instead of storing a byte per weight.
    """

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    clip_search: bool = True
    clip_grid: int = 81
    clip_max_shrink: float = 0.2
    clip_norm: float = 2.0
    clip_weighted: bool = True
    integer_zero: bool = False
    sequential: bool = True
    batch_size: int = 8
    name: str = "gptq"
    needs_calibration: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.damp < 1.0:
            raise InvalidArgument("damp", f"{self.damp}", "a fraction of the mean Hessian diagonal, 0 < damp < 1 (the reference uses 0.01)")
        if self.block_size < 1 or self.batch_size < 1:
            raise InvalidArgument("", f"block_size={self.block_size}, batch_size={self.batch_size}", "positive integers")
        if self.clip_grid < 2:
            raise InvalidArgument(
                "clip_grid",
                f"{self.clip_grid}",
                "an integer >= 2: range factors tried from 1.0 down to clip_max_shrink (81: steps of 0.01 as in the reference)",
            )
        if not 0.0 < self.clip_max_shrink <= 1.0:
            raise InvalidArgument(
                "clip_max_shrink", f"{self.clip_max_shrink}", "the smallest range factor tried, 0 < clip_max_shrink <= 1 (the reference reaches 0.21)"
            )
        if not 0.0 < self.clip_norm <= 8.0:  # larger exponents underflow float32 on small errors
            raise InvalidArgument("clip_norm", f"{self.clip_norm}", "the exponent p of sum |w - q(w)|^p, 0 < clip_norm <= 8 (the reference uses 2.4)")

    def clip(self) -> ClipSearch | None:
        return ClipSearch(self.clip_grid, self.clip_max_shrink, self.clip_norm) if self.clip_search else None

    def quantize(self, model: nn.Module, layout: ModelLayout, bits: Mapping[str, int], group_size: int, calib: torch.Tensor | None) -> dict[str, GroupQuant]:
        return quantize_calibrated(self, model, layout, bits, group_size, calib)

    def quantize_stage(self, weights: list[torch.Tensor], bits: list[int], group_size: int, stats: InputStats) -> list[GroupQuant]:
        return gptq_quantize(
            weights, stats.hessian(), bits, group_size, self.damp, self.block_size, self.act_order, self.clip(), self.clip_weighted, self.integer_zero
        )


def gptq_quantize(
    weights: list[torch.Tensor],
    hessian: torch.Tensor,
    bits: list[int],
    group_size: int,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
    clip: ClipSearch | None = None,
    clip_weighted: bool = False,
    integer_zero: bool = False,
) -> list[GroupQuant]:
    """GPTQ of (out_i, in) weights that read the same inputs, given H (in, in) of those inputs.

    GPTQ treats every output row independently under the same H, so linears sharing an input
    (q/k/v, gate/up) are stacked and solved in one pass, each row with its own layer's width.
    A group's grid is plain min-max, or the range `clip` finds (weighting each column's error by
    1 / [H_F^-1]_jj with `clip_weighted`); `integer_zero`: whole-code zero points (`grid.GridForm`).
    """
    rows = [w.shape[0] for w in weights]
    form = GridForm(weights[0].dtype, integer_zero)  # exact in what the model computes in (`grid.held_scale`)
    W = torch.cat([w.detach().float() for w in weights]).clone()
    out_f, in_f = W.shape
    row_bits = torch.cat([torch.full((r,), b, device=W.device) for r, b in zip(rows, bits)])
    maxq = (2**row_bits - 1).float()
    H = hessian.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(in_f, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    group_of = (perm // group_size).tolist()  # the (original) group of each position in visiting order
    position = torch.argsort(perm)  # where each original column sits in visiting order

    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    Hinv = _upper_cholesky_of_inverse(H)

    n_groups = in_f // group_size
    scale = torch.zeros(out_f, n_groups, device=W.device)
    zero = torch.zeros(out_f, n_groups, device=W.device)
    ready = [False] * n_groups
    codes = torch.zeros_like(W)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        for g in dict.fromkeys(group_of[i1:i2]):  # grids of the groups starting in this block, from
            if not ready[g]:  # the weights as updated so far (the reference's timing)
                members = position[g * group_size : (g + 1) * group_size]
                if clip is None:
                    scale[:, g], zero[:, g] = minmax_grid(W[:, members], row_bits, form=form)
                else:
                    loss_per_error = Hinv.diagonal()[members].pow(-2) if clip_weighted else None
                    scale[:, g], zero[:, g] = clip.grid(W[:, members], row_bits, loss_per_error, form)
                ready[g] = True
        cols = torch.tensor(group_of[i1:i2], device=W.device)
        S1, Z1 = scale[:, cols], zero[:, cols]
        W1, Q1, Err1 = W[:, i1:i2].clone(), torch.zeros(out_f, i2 - i1, device=W.device), torch.zeros(out_f, i2 - i1, device=W.device)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, s, z = W1[:, i], S1[:, i], Z1[:, i]
            q = torch.minimum(torch.round(w / s + z).clamp_(min=0), maxq)
            err = (w - (q - z) * s) / Hinv1[i, i]
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1.0)
            Q1[:, i], Err1[:, i] = q, err
        codes[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    codes, scale, zero = codes[:, position].to(torch.uint8), scale.half(), zero.half()  # original column order
    out, r0 = [], 0
    for r, b in zip(rows, bits):
        out.append(GroupQuant(codes[r0 : r0 + r], scale[r0 : r0 + r], zero[r0 : r0 + r], b, group_size))
        r0 += r
    return out


def _upper_cholesky_of_inverse(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, adding more dampening if H is numerically not positive definite."""
    step = 1e-6 * float(torch.mean(torch.diag(H))) + 1e-12
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0:
                return U
        H = H.clone()
        H.diagonal().add_(step)
        step *= 10
    raise RuntimeError("GPTQ: the Hessian is not positive definite even after extra dampening")
