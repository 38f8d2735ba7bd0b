"""Linear layers that multiply by packed weights directly, one per kernel family.

Both hold the layer in as many bits as `PackedLinear` does (codes plus one scale and zero per group)
and never keep a dequantized copy, so a converted model is as small as its bits say. Both also run
on the CPU (same function, plain torch or torch's CPU int4 kernel), so tests without a GPU check
them against `PackedLinear`.

- `PlanesLinear` (kernel `triton_planes`): codes in bit planes (`amq.runtime.layout`), multiplied
  by amq's Triton kernels (`amq.runtime.triton_kernels`): a GEMV for one row, a fused
  dequantize-and-`tl.dot` for up to `gemm_max_rows` rows, and above that a dequantization into a
  transient bf16 weight and cuBLAS (prefill: the weight is read once for many tokens). The
  dequantization is amq's float32 `(code - zero) * scale`, so fractional zero points stay exact.
- `TinyGemmLinear` (kernel `tinygemm_int4`): torch's own int4 kernel
  (`aten._weight_int4pack_mm`, "tinygemm"), 4-bit only. It computes `(code - 8) * scale + offset`
  with bf16 `scale` and `offset`, so amq's zero becomes `offset = (8 - zero) * scale` rounded to
  bf16: within bf16 rounding of amq's weight, not bit for bit (tests measure it). Its packed layout
  depends on the device, so the layer is built on the device it runs on.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from amq.quantizers.packed import PackedLinear, dequantize_groups, unpack_codes
from amq.runtime.layout import MAX_TILE, TILE_ROWS_MAX, pack_planes, plane_widths, split_workspace, tile_size, unpack_planes

log = logging.getLogger(__name__)

GEMM_MAX_ROWS = TILE_ROWS_MAX  # above this many rows, dequantize + cuBLAS beats the fused tile kernel


def _codes(layer: PackedLinear) -> torch.Tensor:
    return unpack_codes(layer.qweight, layer.bits, (layer.out_features, layer.in_features))


def _flat(x: torch.Tensor, input_scale: torch.Tensor | None) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    if input_scale is not None:  # AWQ: the layer computes dequant @ (x / input_scale)
        x2 = x2 / input_scale.to(x2.dtype)
    return x2.contiguous()


class PlanesLinear(nn.Module):
    """Packed layer multiplied by the bit-plane Triton kernels (CUDA) or plain torch (CPU)."""

    kernel = "triton_planes"

    def __init__(
        self,
        layer: PackedLinear,
        gemm_max_rows: int = GEMM_MAX_ROWS,
        workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
        max_tile: int = MAX_TILE,
    ) -> None:
        """`workspace`: split-K scratch (`layout.split_workspace`) shared with the model's other layers;
        None makes the layer its own (SPLIT_MAX x TILE_ROWS_MAX float32 per row). `max_tile`: the
        largest tile of the layout (`layout.tile_size`); above 256 only to measure other tiles."""
        super().__init__()
        if not 1 <= gemm_max_rows <= TILE_ROWS_MAX:
            raise ValueError(f"gemm_max_rows={gemm_max_rows}: the tile kernel takes 1 to {TILE_ROWS_MAX} rows")
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.bits, self.group_size = layer.bits, layer.group_size
        self.gemm_max_rows = gemm_max_rows
        tile = tile_size(layer.in_features, layer.bits, layer.group_size, max_tile)
        if tile is None:
            raise ValueError(f"in_features={layer.in_features}, group_size={layer.group_size}: no tile of the bit-plane layout fits")
        self.tile = tile
        self.hold(
            pack_planes(_codes(layer), layer.bits, tile),
            layer.scale.detach().clone(),
            layer.zero.detach().clone(),
            None if layer.input_scale is None else layer.input_scale.detach().clone(),
            None if layer.bias is None else layer.bias.detach().clone(),
            workspace,
        )

    def hold(
        self,
        planes: list[torch.Tensor],
        scale: torch.Tensor,
        zero: torch.Tensor,
        input_scale: torch.Tensor | None,
        bias: torch.Tensor | None,
        workspace: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> None:
        """Register the layer's tensors as buffers (`amq.runtime.fuse` gives a stacked layer its own)."""
        self.n_planes = len(planes)
        for i, p in enumerate(planes):
            self.register_buffer(f"plane{i}", p)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.register_buffer("input_scale", input_scale)
        self.register_buffer("bias", bias)
        partial, count = split_workspace(self.out_features, scale.device) if workspace is None else workspace
        need = [t.numel() for t in split_workspace(self.out_features, torch.device("meta"))]
        if partial.numel() < need[0] or count.numel() < need[1]:
            raise ValueError(f"the shared split-K workspace is for fewer than out_features={self.out_features} rows")
        self.register_buffer("split_partial", partial, persistent=False)  # split-K scratch of the kernels
        self.register_buffer("split_count", count, persistent=False)

    def planes(self) -> list[torch.Tensor]:
        return [getattr(self, f"plane{i}") for i in range(self.n_planes)]

    def weight_float(self) -> torch.Tensor:
        """The float32 weight with the input scale folded in (what `PackedLinear.weight_float` gives)."""
        codes = unpack_planes(self.planes(), self.bits, self.in_features, self.tile)
        return dequantize_groups(codes, self.scale, self.zero, self.group_size, self.input_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _flat(x, self.input_scale)
        if x2.is_cuda:
            from amq.runtime import triton_kernels as tk

            m = x2.shape[0]
            planes, geometry = self.planes(), (self.bits, self.group_size, self.tile, self.out_features)
            if m == 1 or (m <= self.gemm_max_rows and self.tile * plane_widths(self.bits)[0] // 32 >= 16):  # tl.dot needs runs of 16
                y = tk.planes_mm(x2, planes, self.scale, self.zero, self.split_partial, self.split_count, *geometry)
            else:
                y = F.linear(x2, tk.dequantize(planes, self.scale, self.zero, *geometry[:3], self.out_features, self.in_features, x2.dtype))
        else:
            codes = unpack_planes(self.planes(), self.bits, self.in_features, self.tile)
            y = F.linear(x2, dequantize_groups(codes, self.scale, self.zero, self.group_size).to(x2.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group_size={self.group_size}, planes={plane_widths(self.bits)}, tile={self.tile}"


def inner_k_tiles(in_features: int) -> int | None:
    """The largest tile count tinygemm accepts for this many input features (None: none fits)."""
    return next((t for t in (8, 4, 2) if in_features % (16 * t) == 0), None)


class TinyGemmLinear(nn.Module):
    """4-bit packed layer multiplied by torch's int4 kernel (tinygemm) on CUDA or CPU."""

    kernel = "tinygemm_int4"

    def __init__(self, layer: PackedLinear, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        if layer.bits != 4:
            raise ValueError(f"tinygemm holds 4-bit codes, not {layer.bits}")
        tiles = inner_k_tiles(layer.in_features)
        if tiles is None:
            raise ValueError(f"in_features={layer.in_features} is not a multiple of 32")
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.bits, self.group_size, self.dtype = 4, layer.group_size, dtype
        codes = _codes(layer).to(torch.int32)
        if codes.is_cuda:
            packed = torch.ops.aten._convert_weight_to_int4pack((codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8), tiles)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, tiles)
        self.register_buffer("packed", packed)
        scale, zero = layer.scale.float(), layer.zero.float()
        offset = (8.0 - zero) * scale  # tinygemm: (code - 8) * scale + offset == (code - zero) * scale
        self.register_buffer("scale_offset", torch.stack([scale.t(), offset.t()], dim=-1).to(dtype).contiguous())  # (groups, out, 2)
        self.register_buffer("input_scale", None if layer.input_scale is None else layer.input_scale.detach().clone())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _flat(x, self.input_scale).to(self.dtype)
        if x2.is_cuda:
            y = torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.group_size, self.scale_offset)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scale_offset)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=4, group_size={self.group_size}"
