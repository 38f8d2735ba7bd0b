"""Real packed weights: group-quantized integer codes stored as a dense bit stream.

Every final quantizer (HQQ, GPTQ, AWQ) returns a `GroupQuant` per linear; `PackedLinear` stores it
so that a 3-bit layer takes 3/8 byte per weight on disk plus one fp16 scale and zero per group,
and dequantizes on the fly in `forward`. The format is the same for all quantizers, so export and
reload don't depend on which one produced the weights.

Two runtimes (`set_runtime`): `dequantized` (the default) keeps each layer's dequantized weight
after its first call, so forwards cost what bf16 costs and so does memory; `packed` keeps only
the packed buffers and dequantizes on every call, so the linears take bits/16 of their bf16
memory at the price of an unpack per call (docs/benchmarks.md, "Packed runtime").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from amq.errors import InvalidArgument

CODES_PER_CHUNK = 8  # 8 codes of b bits fill exactly b bytes, for any b in 1..8


@dataclass
class GroupQuant:
    """Asymmetric group-wise quantization of one (out, in) weight along its input features.

    Group g of row r dequantizes as `(codes[r, g*G:(g+1)*G] - zero[r, g]) * scale[r, g]`. With
    `input_scale` (AWQ), the layer computes `dequant @ (x / input_scale)`, i.e. its effective
    weight is `dequant / input_scale[None, :]`.
    """

    codes: torch.Tensor  # uint8 (out, in), values 0 .. 2**bits - 1
    scale: torch.Tensor  # float16 (out, in // group_size)
    zero: torch.Tensor  # float16 (out, in // group_size)
    bits: int
    group_size: int
    input_scale: torch.Tensor | None = None  # (in,)

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits={self.bits}: packed codes hold 1 to 8 bits")
        out_f, in_f = self.codes.shape
        if in_f % self.group_size:
            raise ValueError(f"group_size={self.group_size} does not divide in_features={in_f}")
        groups = (out_f, in_f // self.group_size)
        if tuple(self.scale.shape) != groups or tuple(self.zero.shape) != groups:
            raise ValueError(f"scale/zero must be {groups}, got {tuple(self.scale.shape)} / {tuple(self.zero.shape)}")
        if self.input_scale is not None and tuple(self.input_scale.shape) != (in_f,):
            raise ValueError(f"input_scale must be ({in_f},), got {tuple(self.input_scale.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        """The effective float32 weight (input scale folded in)."""
        return dequantize_groups(self.codes, self.scale, self.zero, self.group_size, self.input_scale)


def dequantize_groups(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    input_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """float32 `(codes - zero) * scale` per group, divided by the per-input-channel scale if any."""
    out_f, in_f = codes.shape
    g = codes.float().view(out_f, in_f // group_size, group_size)
    w = ((g - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)).view(out_f, in_f)
    return w / input_scale.float().unsqueeze(0) if input_scale is not None else w


def packed_numel(n_codes: int, bits: int) -> int:
    """Bytes of the bit stream for `n_codes` codes (padded to whole 8-code chunks)."""
    return -(-n_codes // CODES_PER_CHUNK) * bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """A dense little-endian bit stream (uint8, 1-D) of the codes in row-major order."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits}: codes hold 1 to 8 bits")
    flat = codes.reshape(-1).to(torch.int64)
    pad = (-flat.numel()) % CODES_PER_CHUNK
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(CODES_PER_CHUNK, device=flat.device, dtype=torch.int64) * bits
    word = (flat.view(-1, CODES_PER_CHUNK) << shifts).sum(dim=1, keepdim=True)  # 8*bits <= 64 bits
    byte_shifts = torch.arange(bits, device=flat.device, dtype=torch.int64) * 8
    return ((word >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 codes of `shape`.

    This runs on every forward of a `packed` runtime, so it avoids int64 temporaries: widths that
    divide 8 split each byte in place, the others assemble each chunk's word in int32 (int64 only
    for 5-7 bits, whose 8-code words exceed 32 bits).
    """
    n = 1
    for d in shape:
        n *= d
    if packed.numel() != packed_numel(n, bits):
        raise ValueError(f"{packed.numel()} packed bytes do not hold {n} codes of {bits} bits")
    mask = (1 << bits) - 1
    if 8 % bits == 0:  # 1, 2, 4, 8 bits: whole codes per byte, lowest bits first
        parts = [packed] if bits == 8 else [(packed >> (bits * i)) & mask for i in range(8 // bits)]
        codes = torch.stack(parts, dim=-1)
    else:
        dtype = torch.int32 if bits * CODES_PER_CHUNK <= 32 else torch.int64
        chunk = packed.view(-1, bits).to(dtype)
        word = chunk[:, 0].clone()
        for j in range(1, bits):
            word |= chunk[:, j] << (8 * j)
        codes = torch.stack([((word >> (bits * k)) & mask).to(torch.uint8) for k in range(CODES_PER_CHUNK)], dim=-1)
    return codes.reshape(-1)[:n].view(shape)


def dequantize_packed(
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    input_scale: torch.Tensor | None,
    bits: int,
    group_size: int,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    """The float32 weight of a packed layer: unpack, then dequantize (one function, so it compiles whole)."""
    codes = unpack_codes(qweight, bits, (out_features, in_features))
    return dequantize_groups(codes, scale, zero, group_size, input_scale)


class PackedLinear(nn.Module):
    """A linear layer whose weight lives as packed group-quantized codes (inference only)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        has_bias: bool,
        has_input_scale: bool,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"group_size={group_size} does not divide in_features={in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        groups = (out_features, in_features // group_size)
        self.register_buffer("qweight", torch.zeros(packed_numel(in_features * out_features, bits), dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.zeros(groups, dtype=torch.float16, device=device))
        self.register_buffer("zero", torch.zeros(groups, dtype=torch.float16, device=device))
        self.register_buffer("input_scale", torch.ones(in_features, dtype=torch.float16, device=device) if has_input_scale else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if has_bias else None)
        self.keep_dequantized = True
        self.dequantizer: Callable[..., torch.Tensor] | None = None  # a compiled dequantize_packed (set_runtime)
        self._dequantized: torch.Tensor | None = None

    @classmethod
    def empty(cls, *args: Any, **kwargs: Any) -> "PackedLinear":
        """A zero-filled layer (the constructor's arguments), for a loader to fill with `load_state_dict`."""
        return cls(*args, **kwargs)

    @classmethod
    def from_quant(cls, q: GroupQuant, bias: torch.Tensor | None, dtype: torch.dtype) -> "PackedLinear":
        out_f, in_f = q.shape
        device = q.codes.device
        layer = cls(in_f, out_f, q.bits, q.group_size, bias is not None, q.input_scale is not None, dtype, device)
        layer.qweight.copy_(pack_codes(q.codes, q.bits))
        layer.scale.copy_(q.scale)
        layer.zero.copy_(q.zero)
        if q.input_scale is not None:
            layer.input_scale.copy_(q.input_scale)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    def to_quant(self) -> GroupQuant:
        """The GroupQuant this layer stores (codes unpacked)."""
        codes = unpack_codes(self.qweight, self.bits, (self.out_features, self.in_features))
        return GroupQuant(codes, self.scale, self.zero, self.bits, self.group_size, self.input_scale)

    def weight_float(self) -> torch.Tensor:
        """The effective float32 weight, dequantized from the packed codes."""
        unpack = self.dequantizer or dequantize_packed
        return unpack(self.qweight, self.scale, self.zero, self.input_scale, self.bits, self.group_size, self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Dequantize in float32 (bf16 cannot hold code - zero exactly at 8 bits), then run the
        # matmul in the activation dtype. With `keep_dequantized` the weight is kept after the
        # first call (not part of the state; dropped on load_state_dict), since unpacking in plain
        # torch costs more than a short forward's matmul; without it only the packed buffers stay.
        w = self._dequantized
        if w is None or w.dtype != x.dtype or w.device != x.device:
            w = self.weight_float().to(x.dtype)
            if self.keep_dequantized:
                self._dequantized = w
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, w, bias)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._dequantized = None
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        awq = ", input_scale" if self.input_scale is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}{awq}"
        )


def replace_linears(model: nn.Module, quants: Mapping[str, GroupQuant], dtype: torch.dtype) -> None:
    """Swap each named `nn.Linear` for a `PackedLinear` holding its quantization (bias kept)."""
    for name, q in quants.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child, None)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{name!r} is not an nn.Linear of the model (found {type(module).__name__})")
        if q.shape != (module.out_features, module.in_features):
            raise ValueError(f"{name}: quantized shape {q.shape} != weight shape {tuple(module.weight.shape)}")
        setattr(parent, child, PackedLinear.from_quant(q, module.bias, dtype))


RUNTIMES = ("dequantized", "packed")


def check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise InvalidArgument("runtime", repr(runtime), ", ".join(RUNTIMES))


def set_runtime(model: nn.Module, runtime: str, compile: bool = False) -> int:
    """Choose how every PackedLinear of `model` holds its weight at run time; returns how many.

    `dequantized`: keep the dequantized weight after the first call (fast, bf16-sized memory).
    `packed`: keep only the packed codes and dequantize on every call (small memory, slower).
    `compile`: dequantize through `torch.compile`, which fuses the unpacking into a few kernels
    (same values; on one H100 5-6x faster per layer than eager; compiles once per width and shape).
    """
    check_runtime(runtime)
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    dequantizer = torch.compile(dequantize_packed) if compile else None
    for m in layers:
        m.keep_dequantized = runtime == "dequantized"
        m.dequantizer = dequantizer
        if not m.keep_dequantized:
            m._dequantized = None
    return len(layers)


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every parameter, buffer and kept dequantized weight of `model` (tied tensors once)."""
    seen: set[int] = set()
    total = 0
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [m._dequantized for m in model.modules() if isinstance(m, PackedLinear) and m._dequantized is not None]
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def packed_bytes(model: nn.Module) -> int:
    """Bytes of every PackedLinear's codes, scales, zeros and input scales (biases not counted)."""
    total = 0
    for m in model.modules():
        if isinstance(m, PackedLinear):
            for t in (m.qweight, m.scale, m.zero, m.input_scale):
                if t is not None:
                    total += t.numel() * t.element_size()
    return total
