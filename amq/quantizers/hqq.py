"""HQQ as a final quantizer: the proxy's own quantizer, its results stored as packed GroupQuants.

Calibration-free, so the deployed model is quantized exactly as the search's proxy was (up to the
rounding of HQQ's float32 scale and zero to float16 values that the model's dtype holds exactly).
Groups run along the input features (HQQ axis 1), the layout `PackedLinear` stores.

HQQ optimises each group's zero point as a real number. `integer_zero` moves it to the better of
its two neighbouring whole codes (`grid.nearest_integer_zero`) and rounds the weights again onto
that grid (HQQ's scale kept), so the compressed-tensors
export bit-packs every layer (`pack-quantized`, what vLLM serves); the model then differs a little
from the search's proxy (docs/benchmarks.md has what it costs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from amq.modeling.discovery import ModelLayout
from amq.quantizers.checks import selected_linears
from amq.quantizers.grid import grouped, held_scale, held_zero, nearest_integer_zero, to_codes
from amq.quantizers.hqq_proxy import HQQ_PACKABLE_BITS, HQQQuantizer
from amq.quantizers.packed import GroupQuant


@dataclass(frozen=True)
class HQQFinalizer:
    """HQQ with the proxy's settings (`optimize`), per-layer bits; `integer_zero`: whole-code zero points."""

    optimize: bool = True
    integer_zero: bool = False
    name: str = "hqq"
    needs_calibration: bool = False

    @torch.no_grad()
    def quantize(
        self, model: nn.Module, layout: ModelLayout, bits: Mapping[str, int], group_size: int, calib: torch.Tensor | None = None
    ) -> dict[str, GroupQuant]:
        linears = selected_linears(layout, bits, group_size, self.name, HQQ_PACKABLE_BITS)
        hqq = HQQQuantizer(group_size=group_size, axis=1, optimize=self.optimize)
        return {li.name: hqq_group_quant(hqq, model.get_submodule(li.name).weight, bits[li.name], self.integer_zero) for li in linears}


def hqq_group_quant(hqq: HQQQuantizer, weight: torch.Tensor, bits: int, integer_zero: bool = False) -> GroupQuant:
    """One weight through HQQ (axis 1), as codes with float16 scale and zero per group, exact in the
    weight's dtype (`grid.held_scale`, `grid.held_zero`); `integer_zero`: zero points moved to whole
    codes and the codes chosen again on that grid (see the module docstring)."""
    out_f, in_f = weight.shape
    codes, meta = hqq.quantize(weight.detach(), bits, bitpack=False)
    groups = (out_f, in_f // hqq.group_size)
    scale = held_scale(meta["scale"].reshape(groups).float(), weight.dtype)
    if integer_zero:
        w = grouped(weight.detach().float(), hqq.group_size)
        zero = nearest_integer_zero(w, scale, meta["zero"].reshape(groups).float(), bits)
        codes = to_codes(w, scale, zero, bits)
    else:
        zero = held_zero(meta["zero"].reshape(groups).float(), bits, weight.dtype)
    return GroupQuant(codes.reshape(out_f, in_f).to(torch.uint8), scale.half(), zero.half(), bits, hqq.group_size)
