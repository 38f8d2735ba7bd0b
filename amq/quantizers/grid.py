"""Asymmetric min-max group grids: the quantization grid GPTQ and AWQ round onto.

The scale and zero are rounded to float16 before any weight is rounded onto the grid, so what a
quantizer optimises is exactly what `PackedLinear` stores. The range always includes 0 (as in the
GPTQ reference), which keeps the zero point inside [0, 2**bits - 1] where float16 holds it finely.
For a model that computes in a narrower dtype than float32 (bfloat16, float16) they are rounded
further (`held_scale`, `held_zero`), so that a loader computing `(q - zero) * scale` in that dtype,
as compressed-tensors' does, gets amq's float32 weights rounded once: the same weights, bit for bit.
`integer_zero` rounds each zero point to a whole code before any weight is rounded (the GPTQ
reference's grid): what a bit-packed checkpoint (`pack-quantized`, the layout vLLM serves) holds.

A range (clipping) search narrows each group's min-max range by the factor, among a few
candidates, that rounds the group with the least error: a few large weights then no longer
stretch the grid at the cost of all the others. GPTQ scores a candidate by
sum_j c_j |w_j - q(w_j)|^p (`ClipSearch`; c_j = 1 is the GPTQ reference's `mse` option), AWQ by
the group's output error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from amq.quantizers.packed import GroupQuant

MIN_SCALE = 2.0**-20  # keeps 1/scale finite once the scale is rounded to float16
CPU_CHUNK = 2**18  # weight copies a range search scores at once on a CPU: stays in a core's cache
GPU_CHUNK = 2**24  # on an accelerator: few, large kernels (64 MiB per float32 intermediate)


def significant_digits(dtype: torch.dtype) -> int:
    """Binary digits of a float dtype's significand (bfloat16 8, float16 11, float32 24)."""
    return 1 - int(math.log2(torch.finfo(dtype).eps))


def held_scale(scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """float32 `scale` rounded to a value float16 stores and a model computing in `dtype` holds exactly.

    Why: compressed-tensors' loader casts each float16 group scale to the model's dtype, which for
    bfloat16 would move it by up to 2^-9 of itself; a scale exact in both keeps amq's value.
    """
    if significant_digits(dtype) < significant_digits(torch.float16):
        scale = scale.to(dtype)
    return scale.half().float()


def held_zero(zero: torch.Tensor, bits: int | torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """float32 zero point in [0, 2^bits - 1] rounded so that `q - zero` is exact in `dtype` for every code q.

    With `dtype`'s d significant digits that is a multiple of 2^(bits - d) (bfloat16: 1/16 of a
    step at 4 bits, whole steps at 8); with a `held_scale` the product `(q - zero) * scale` then
    rounds once in `dtype`, as amq's float32 dequantization cast to `dtype` does. float32: float16.
    """
    digits = significant_digits(dtype)
    if digits < significant_digits(torch.float32):
        quantum = torch.exp2(torch.as_tensor(bits, dtype=torch.float32, device=zero.device) - digits)
        zero = torch.round(zero / quantum) * quantum
    return zero.half().float()


@dataclass(frozen=True)
class GridForm:
    """What a grid's scale and zero must hold besides the range: exact values in `dtype`, the dtype
    the model computes in (`held_scale`, `held_zero`), and with `integer_zero` whole-code zero
    points in [0, 2^bits - 1] (what `pack-quantized` checkpoints store). One value, so the searches
    that lay many grids pass it along unchanged."""

    dtype: torch.dtype = torch.float32
    integer_zero: bool = False


def minmax_grid(
    w: torch.Tensor, bits: int | torch.Tensor, shrink: torch.Tensor | float = 1.0, form: GridForm = GridForm()
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of `w` (..., G), float32 values that are exact in float16 and of the grid's `form`.

    `shrink` (broadcast against the rows) narrows the range before the grid is laid, for clipping
    searches; 1.0 is plain min-max. `bits` may be a tensor of one width per row.
    """
    maxq = 2**bits - 1
    lo = (w.amin(dim=-1) * shrink).clamp(max=0)
    hi = (w.amax(dim=-1) * shrink).clamp(min=0)
    scale = held_scale(((hi - lo) / maxq).clamp(min=MIN_SCALE), form.dtype)
    if form.integer_zero:  # whole codes are exact in every dtype a model computes in (<= 256)
        return scale, torch.minimum(torch.round(-lo / scale).clamp_(min=0), torch.as_tensor(maxq, dtype=scale.dtype, device=scale.device))
    zero = held_zero(-lo / scale, bits, form.dtype)
    return scale, zero


def to_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int | torch.Tensor) -> torch.Tensor:
    """Round `w` (..., G) onto the grid of (scale, zero) given per row (...,); float codes.

    `bits` may be a tensor of one width per row (broadcast against the rows).
    """
    codes = torch.div(w, scale.unsqueeze(-1)).add_(zero.unsqueeze(-1)).round_().clamp_(min=0)
    maxq = 2**bits - 1
    return torch.minimum(codes, maxq.unsqueeze(-1)) if isinstance(maxq, torch.Tensor) else codes.clamp_(max=maxq)


def from_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """The values of float `codes` (..., G); `inplace` overwrites the codes (saves a copy in searches)."""
    out = codes if inplace else codes.clone()
    return out.sub_(zero.unsqueeze(-1)).mul_(scale.unsqueeze(-1))


def nearest_integer_zero(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Per row of `w` (..., G), the whole code next to the real zero point `zero` (its floor or its
    ceiling, in [0, 2^bits - 1]) whose grid rounds the row with the smaller squared error.

    Why not plain rounding: an optimised zero (HQQ's) sits where the error is low, and the better
    of its two neighbours loses less of that than the nearer one does (measured: docs/benchmarks.md)."""
    candidates = torch.stack([zero.floor(), zero.ceil()]).clamp_(0, 2**bits - 1)  # (2, ...)
    scales = scale.expand_as(candidates)
    err = (from_codes(to_codes(w, scales, candidates, bits), scales, candidates, inplace=True) - w).pow_(2).sum(-1)
    return torch.where(err[1] < err[0], candidates[1], candidates[0])


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, in) -> (out, in // G, G) view."""
    out_f, in_f = w.shape
    return w.reshape(out_f, in_f // group_size, group_size)


def round_to_nearest(
    w: torch.Tensor, bits: int, group_size: int, shrink: torch.Tensor | float = 1.0, form: GridForm | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest on the min-max grid: (float codes, scale, zero) of an (out, in) weight.

    `form`: the grid's (`GridForm`); by default exact in the weight's own dtype.
    """
    g = grouped(w.float(), group_size)
    scale, zero = minmax_grid(g, bits, shrink, GridForm(w.dtype) if form is None else form)
    return to_codes(g, scale, zero, bits).reshape(w.shape), scale, zero


def rtn_quant(weight: torch.Tensor, bits: int, group_size: int) -> GroupQuant:
    """Plain round-to-nearest with min-max groups: the calibration-free baseline."""
    codes, scale, zero = round_to_nearest(weight, bits, group_size)
    return GroupQuant(codes.to(torch.uint8), scale.half(), zero.half(), bits, group_size)


def shrink_ratios(n_grid: int, max_shrink: float) -> torch.Tensor:
    """`n_grid` range factors evenly spaced from 1.0 (plain min-max, tried first) down to `max_shrink`."""
    return torch.linspace(1.0, max_shrink, n_grid)


def lp_error(e: torch.Tensor, p: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """sum_j weight_j |e_j|^p over the last dimension (weight 1: the GPTQ reference's score)."""
    a = e.abs().pow_(p)
    return (a if weight is None else a.mul_(weight)).sum(dim=-1)


def search_shrink(
    w: torch.Tensor,
    bits: int | torch.Tensor,
    ratios: torch.Tensor,
    error: Callable[[torch.Tensor], torch.Tensor],
    max_elements: int | None = None,
    form: GridForm = GridForm(),
) -> torch.Tensor:
    """Per row of `w` (..., G), the range factor among `ratios` whose grid rounds the row with the least `error`.

    `error` maps rounding errors (C, ..., G) of C candidates to scores (C, ...). Candidates are
    scored together, `max_elements` weight copies at a time (at least one candidate; by default
    `CPU_CHUNK` or `GPU_CHUNK` after the device of `w`). Ties keep the earlier candidate, so with
    `ratios[0] == 1.0` a row is clipped only where that strictly lowers its error, and the search
    never does worse than plain min-max. `form`: the grids' (`GridForm`).
    """
    ratios = ratios.to(device=w.device, dtype=w.dtype)
    rows = w.shape[:-1]
    max_elements = max_elements or (CPU_CHUNK if w.device.type == "cpu" else GPU_CHUNK)
    chunk = max(1, max_elements // max(1, w.numel()))
    best_err = torch.full(rows, float("inf"), device=w.device)
    best = torch.ones(rows, device=w.device, dtype=w.dtype)
    for c0 in range(0, len(ratios), chunk):
        r = ratios[c0 : c0 + chunk].view(-1, *([1] * len(rows)))  # (C, 1, ...) against the rows
        scale, zero = minmax_grid(w, bits, r, form)  # (C, ...)
        err = error(from_codes(to_codes(w, scale, zero, bits), scale, zero, inplace=True).sub_(w))
        err, i = err.min(dim=0)  # the first minimum among this chunk's candidates
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, r.flatten()[i], best)
    return best


@dataclass(frozen=True)
class ClipSearch:
    """Range search over `n_grid` factors of the min-max range, from 1.0 down to `max_shrink`.

    A row's factor minimises sum_j c_j |w_j - q(w_j)|^norm over its group's columns j, with c_j = 1
    (the GPTQ reference) or column weights the caller knows better. The defaults are the GPTQ
    reference's (grid 100, maxshrink 0.8, norm 2.4: factors 1.00, 0.99, ..., 0.21; here 0.20).
    """

    n_grid: int = 81
    max_shrink: float = 0.2
    norm: float = 2.4

    def grid(
        self,
        w: torch.Tensor,
        bits: int | torch.Tensor,
        col_weight: torch.Tensor | None = None,
        form: GridForm = GridForm(),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) per row of `w` (..., G) of the grid's `form`; `col_weight` (G,) scales each column's error."""
        error = partial(lp_error, p=self.norm, weight=col_weight)
        shrink = search_shrink(w, bits, shrink_ratios(self.n_grid, self.max_shrink), error, form=form)
        return minmax_grid(w, bits, shrink, form)
