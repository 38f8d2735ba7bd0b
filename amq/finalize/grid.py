"""Asymmetric min-max group grids: the quantization grid GPTQ and AWQ round onto.

The scale and zero are rounded to float16 before any weight is rounded onto the grid, so what a
quantizer optimises is exactly what `PackedLinear` stores. The range always includes 0 (as in the
GPTQ reference), which keeps the zero point inside [0, 2**bits - 1] where float16 holds it finely.
"""

from __future__ import annotations

import torch

from amq.finalize.packed import GroupQuant

MIN_SCALE = 2.0**-20  # keeps 1/scale finite once the scale is rounded to float16


def minmax_grid(w: torch.Tensor, bits: int | torch.Tensor, shrink: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of `w` (..., G), float32 values that are exact in float16.

    `shrink` (broadcast against the rows) narrows the range before the grid is laid, for clipping
    searches; 1.0 is plain min-max. `bits` may be a tensor of one width per row.
    """
    maxq = 2**bits - 1
    lo = (w.amin(dim=-1) * shrink).clamp(max=0)
    hi = (w.amax(dim=-1) * shrink).clamp(min=0)
    scale = ((hi - lo) / maxq).clamp(min=MIN_SCALE).half().float()
    zero = (-lo / scale).half().float()
    return scale, zero


def to_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Round `w` (..., G) onto the grid of (scale, zero) given per row (...,); float codes."""
    return torch.clamp(torch.round(w / scale.unsqueeze(-1) + zero.unsqueeze(-1)), 0, 2**bits - 1)


def from_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (codes - zero.unsqueeze(-1)) * scale.unsqueeze(-1)


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, in) -> (out, in // G, G) view."""
    out_f, in_f = w.shape
    return w.reshape(out_f, in_f // group_size, group_size)


def round_to_nearest(
    w: torch.Tensor, bits: int, group_size: int, shrink: torch.Tensor | float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest on the min-max grid: (float codes, scale, zero) of an (out, in) weight."""
    g = grouped(w.float(), group_size)
    scale, zero = minmax_grid(g, bits, shrink)
    return to_codes(g, scale, zero, bits).reshape(w.shape), scale, zero


def rtn_quant(weight: torch.Tensor, bits: int, group_size: int) -> GroupQuant:
    """Plain round-to-nearest with min-max groups: the calibration-free baseline."""
    codes, scale, zero = round_to_nearest(weight, bits, group_size)
    return GroupQuant(codes.to(torch.uint8), scale.half(), zero.half(), bits, group_size)
