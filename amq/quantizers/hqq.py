"""HQQ as a final quantizer: the proxy's own quantizer, its results stored as packed GroupQuants.

Calibration-free, so the deployed model is quantized exactly as the search's proxy was (up to the
rounding of HQQ's float32 scale and zero to float16 values that the model's dtype holds exactly);
where the proxy ran with these settings, the finalize stage takes its cached results
(`group_quant_from_proxy`) instead of running HQQ again.
Groups run along the input features (HQQ axis 1), the layout `PackedLinear` stores.

HQQ optimises each group's zero point as a real number. `integer_zero` moves it to the better of
its two neighbouring whole codes and rounds the weights again onto that grid (HQQ's scale kept;
`hqq_proxy`), so the compressed-tensors export bit-packs every layer (`pack-quantized`, what vLLM
serves). It follows the proxy's `quantizer.integer_zero` unless set: a search on the fractional
proxy ranks configurations for fractional zeros (docs/benchmarks.md has what the mismatch costs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from amq.modeling.discovery import ModelLayout
from amq.quantizers.checks import selected_linears
from amq.quantizers.grid import held_scale, held_zero
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
        hqq = HQQQuantizer(group_size=group_size, axis=1, optimize=self.optimize, integer_zero=self.integer_zero)
        return {li.name: hqq_group_quant(hqq, model.get_submodule(li.name).weight, bits[li.name]) for li in linears}


def hqq_group_quant(hqq: HQQQuantizer, weight: torch.Tensor, bits: int) -> GroupQuant:
    """One weight through HQQ (axis 1), as codes with float16 scale and zero per group, exact in the
    weight's dtype (`grid.held_scale`, `grid.held_zero`; whole-code zero points stay as they are)."""
    codes, meta = hqq.quantize(weight.detach(), bits, bitpack=False)
    return _held_group_quant(codes, meta, weight, bits, hqq.group_size)


def _held_group_quant(codes: torch.Tensor, meta: dict, weight: torch.Tensor, bits: int, group: int) -> GroupQuant:
    """HQQ's unpacked codes and meta of `weight` as a GroupQuant on the weight's device, scale and zero
    in float16 values the weight's dtype holds exactly."""
    out_f, in_f = weight.shape
    groups, device = (out_f, in_f // group), weight.device
    return GroupQuant(
        codes.reshape(out_f, in_f).to(device=device, dtype=torch.uint8),
        held_scale(meta["scale"].reshape(groups).float(), weight.dtype).half().to(device),
        held_zero(meta["zero"].reshape(groups).float(), bits, weight.dtype).half().to(device),
        bits,
        group,
    )


def group_quant_from_proxy(w_q: torch.Tensor, meta: dict, weight: torch.Tensor, bits: int) -> GroupQuant:
    """`hqq_group_quant(weight)` from the proxy's HQQ result for it (`amq.proxy.bank.cached_width`: same
    settings, axis 1): HQQ's packed codes unpacked, its scale and zero held as there. The finalize
    stage then need not run HQQ again on what the search already quantized."""
    from hqq.core.quantize import Quantizer

    out_f, in_f = weight.shape
    group = int(meta["group_size"])
    if meta.get("axis") != 1 or int(meta.get("nbits", bits)) != bits or tuple(meta["shape"]) != (out_f, in_f):
        raise ValueError(f"the proxy's result is not {bits}-bit HQQ along axis 1 of a {out_f} x {in_f} weight")
    rows = out_f * in_f // group  # 3-bit packing pads rows
    codes = Quantizer.unpack[meta["packing"]](w_q, dtype=torch.uint8)[:rows] if "packing" in meta else w_q
    return _held_group_quant(codes, meta, weight, bits, group)  # the cache is read onto the CPU; the layer goes where the weight is
