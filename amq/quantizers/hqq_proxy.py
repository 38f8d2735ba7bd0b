"""HQQ (half-quadratic quantization) as pure tensor functions, through the `hqq` package.

Calibration-free and fast, so quantizing every linear at every candidate bit width up front is
cheap; the search then only swaps weights in. `integer_zero` moves each group's optimised zero point
to a whole code (the better of its two neighbours) and chooses the codes again: the grid a bit-packed
checkpoint holds, so a search with it ranks the configurations that such a checkpoint ships.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable

import torch

from amq.errors import InvalidArgument
from amq.modeling.discovery import LinearInfo

HQQ_PACKABLE_BITS = (1, 2, 3, 4, 5, 6, 8)


@dataclass(frozen=True)
class HQQQuantizer:
    """Asymmetric group-wise HQQ; `group_size` weights share one scale and zero."""

    group_size: int = 64
    axis: int = 1
    optimize: bool = True
    storage: str = "dequantized"  # how the proxy bank keeps results in memory (not a quantization setting)
    integer_zero: bool = False
    name: str = "hqq"

    def settings(self) -> dict[str, Any]:
        """What determines the quantized values (the proxy cache key; `integer_zero` only when on, so
        the keys of caches written before it existed still match)."""
        import hqq

        s = asdict(self)
        s.pop("storage")
        if not self.integer_zero:
            s.pop("integer_zero")
        return {**s, "hqq_version": getattr(hqq, "__version__", "unknown")}

    def validate(self, bits: Iterable[int], linears: Iterable[LinearInfo]) -> None:
        """Reject bit widths HQQ can't pack and group sizes that don't tile every layer."""
        for b in bits:
            if b not in HQQ_PACKABLE_BITS:
                raise InvalidArgument("bits", f"{b}-bit is not a width HQQ packs", ", ".join(map(str, HQQ_PACKABLE_BITS)))
        if self.axis not in (0, 1):
            raise InvalidArgument("axis", f"{self.axis}", "0 or 1")
        if self.group_size < 1:
            raise InvalidArgument("group_size", f"{self.group_size}", "a positive divisor of every layer's input features")
        for li in linears:
            dim = li.in_features if self.axis == 1 else li.out_features
            if dim % self.group_size:
                raise InvalidArgument(
                    "group_size",
                    f"{self.group_size} does not divide {li.name} ({'in' if self.axis == 1 else 'out'}_features={dim})",
                    _divisors_hint(linears, self.axis),
                )

    def quantize(self, weight: torch.Tensor, nbits: int, bitpack: bool = True) -> tuple[torch.Tensor, dict]:
        """Integer weights (HQQ-packed unless `bitpack=False`) and HQQ's meta (scale, zero, shape), on the weight's device."""
        from hqq.core.quantize import Quantizer

        w_q, meta = Quantizer.quantize(
            weight.float(),
            nbits=nbits,
            group_size=self.group_size,
            axis=self.axis,
            optimize=self.optimize,
            bitpack=bitpack and not self.integer_zero,
            compute_dtype=torch.float32,
            device=str(weight.device),
        )
        if self.integer_zero:
            w_q = _whole_zero_points(weight, meta, nbits)
            if bitpack:
                meta["packing"] = Quantizer.bit_to_packing[nbits]
                w_q = Quantizer.pack[meta["packing"]](w_q)
        return w_q, meta

    @staticmethod
    def dequantize(w_q: torch.Tensor, meta: dict) -> torch.Tensor:
        from hqq.core.quantize import Quantizer

        return Quantizer.dequantize(w_q, meta).reshape(meta["shape"])

    @staticmethod
    def dequantize_into(out: torch.Tensor, w_q: torch.Tensor, meta: dict) -> None:
        """`out.copy_(dequantize(w_q, meta))` as one pure tensor expression (HQQ's unpacking, then
        (codes - zero) * scale, cast into `out`): written so torch.compile fuses it into few kernels."""
        from hqq.core.quantize import Quantizer

        rows = meta["group_size"] if meta["axis"] == 0 else out.numel() // meta["group_size"]  # 3-bit packing pads rows
        codes = Quantizer.unpack[meta["packing"]](w_q, dtype=meta["scale"].dtype)[:rows]
        out.copy_(((codes - meta["zero"]) * meta["scale"]).view(out.shape))


def _whole_zero_points(weight: torch.Tensor, meta: dict, nbits: int) -> torch.Tensor:
    """Move HQQ's zero points (in `meta`, in place) to whole codes and return the codes chosen again,
    in HQQ's unpacked layout (one row per group for axis 1, one column per group for axis 0)."""
    from amq.quantizers.grid import nearest_integer_zero, to_codes

    g, axis = meta["group_size"], meta["axis"]
    w = weight.float().reshape(-1, g) if axis == 1 else weight.float().reshape(g, -1).T  # one row per group
    scale, zero = meta["scale"].reshape(-1), meta["zero"].reshape(-1)
    whole = nearest_integer_zero(w, scale, zero, nbits)
    codes = to_codes(w, scale, whole, nbits)
    meta["zero"] = whole.reshape(meta["zero"].shape)
    return (codes if axis == 1 else codes.T).contiguous()


def _divisors_hint(linears: Iterable[LinearInfo], axis: int) -> str:
    dims = {li.in_features if axis == 1 else li.out_features for li in linears}
    common = [g for g in (32, 64, 128, 256) if all(d % g == 0 for d in dims)]
    return ", ".join(map(str, common)) if common else f"a divisor of all of {sorted(dims)}"
