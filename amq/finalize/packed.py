"""Really packed weights: integer codes in a dense bit stream plus per-group scale and zero.

Every final quantizer (HQQ, GPTQ, AWQ) produces the same `GroupQuant`, so export, reload and
evaluation have one format: `W[:, g*G:(g+1)*G] = (codes - zero) * scale`, optionally divided
column-wise by an AWQ input scale. A 3-bit layer takes 3/8 byte per weight on disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class GroupQuant:
    """One quantized linear: codes (out, in) uint8, scale/zero (out, in // group_size) float16."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    input_scale: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero, self.group_size, self.input_scale)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
               input_scale: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    out_f, in_f = codes.shape
    c = codes.to(dtype).view(out_f, in_f // group_size, group_size)
    w = ((c - zero.to(dtype).unsqueeze(-1)) * scale.to(dtype).unsqueeze(-1)).view(out_f, in_f)
    return w / input_scale.to(dtype)[None, :] if input_scale is not None else w


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (values < 2**bits) -> a dense little-endian bit stream of ceil(n * bits / 8) bytes."""
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.clone()
    shifts = torch.arange(bits, dtype=torch.uint8, device=flat.device)
    stream = ((flat.unsqueeze(-1) >> shifts) & 1).reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = (1 << torch.arange(8, dtype=torch.int32, device=flat.device))
    return (stream.view(-1, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of pack_codes."""
    n = 1
    for s in shape:
        n *= s
    if bits == 8:
        return packed[:n].view(shape)
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.unsqueeze(-1) >> shifts) & 1).reshape(-1)[: n * bits].view(n, bits)
    weights = (1 << torch.arange(bits, dtype=torch.int32, device=packed.device))
    return (stream.to(torch.int32) * weights).sum(-1).to(torch.uint8).view(shape)


class PackedLinear(nn.Module):
    """A linear layer stored packed; dequantizes in the activation dtype on every forward."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, has_bias: bool,
                 has_input_scale: bool, dtype: torch.dtype) -> None:
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"group size {group_size} does not divide {in_features} input features")
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        n_bytes = (in_features * out_features * bits + 7) // 8
        groups = (out_features, in_features // group_size)
        self.register_buffer("qweight", torch.zeros(n_bytes, dtype=torch.uint8))
        self.register_buffer("scale", torch.zeros(groups, dtype=torch.float16))
        self.register_buffer("zero", torch.zeros(groups, dtype=torch.float16))
        self.register_buffer("input_scale", torch.ones(in_features, dtype=torch.float16) if has_input_scale else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if has_bias else None)
        self.cache_dequantized = True
        self._dequantized: torch.Tensor | None = None

    @classmethod
    def empty(cls, in_features: int, out_features: int, bits: int, group_size: int, has_bias: bool,
              has_input_scale: bool, dtype: torch.dtype) -> "PackedLinear":
        return cls(in_features, out_features, bits, group_size, has_bias, has_input_scale, dtype)

    @classmethod
    def from_quant(cls, q: GroupQuant, bias: torch.Tensor | None, dtype: torch.dtype) -> "PackedLinear":
        out_f, in_f = q.codes.shape
        m = cls(in_f, out_f, q.bits, q.group_size, bias is not None, q.input_scale is not None, dtype)
        m.qweight = pack_codes(q.codes, q.bits)
        m.scale, m.zero = q.scale.to(torch.float16).contiguous(), q.zero.to(torch.float16).contiguous()
        if q.input_scale is not None:
            m.input_scale = q.input_scale.to(torch.float16).contiguous()
        if bias is not None:
            m.bias = bias.detach().to(dtype).clone()
        return m

    def weight_dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The effective weight, computed in float32 (bf16 can't hold code - zero exactly), then cast."""
        codes = unpack_codes(self.qweight, self.bits, (self.out_features, self.in_features))
        return dequantize(codes, self.scale, self.zero, self.group_size, self.input_scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Unpacking a bit stream in plain torch costs far more than the matmul, so the dequantized
        # weight is kept after the first call (not part of the state; dropped on load_state_dict).
        # Storage and files stay packed; memory-saving inference needs a packed kernel.
        w = self._dequantized
        if w is None or w.dtype != x.dtype or w.device != x.device:
            w = self.weight_dequantized(x.dtype)
            if self.cache_dequantized:
                self._dequantized = w
        return F.linear(x, w, self.bias)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._dequantized = None
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group_size={self.group_size}"


def replace_linears(model: nn.Module, quants: Mapping[str, GroupQuant], dtype: torch.dtype) -> None:
    """Swap each named nn.Linear for a PackedLinear on the same device, keeping its bias."""
    for name, q in quants.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        setattr(parent, child, PackedLinear.from_quant(q, old.bias, dtype).to(old.weight.device))


def packed_bytes(model: nn.Module) -> int:
    """Bytes held by the packed layers (codes, scales, zeros, input scales, biases)."""
    return sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, PackedLinear) for b in m.buffers())
