"""Bit accounting and the bit-assignment value object.

Convention (the AMQ reference's): only the searchable decoder linears count, and every group of
`group_size` weights carries a 16-bit scale and a 16-bit zero, i.e. +32/group_size bits per weight.
Uniform 4-bit at group 128 is then 4.25 bits. The weight-only figure (no scale/zero) is always
reported next to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

CONVENTION_WITH_META = "searchable linears, weights + fp16 scale and zero per group"
CONVENTION_WEIGHTS_ONLY = "searchable linears, weights only"
META_BITS_PER_GROUP = 32  # fp16 scale + fp16 zero
BITCONFIG_VERSION = 1


def meta_overhead(group_size: int) -> float:
    """Extra bits per weight spent on the per-group scale and zero."""
    return META_BITS_PER_GROUP / group_size


def average_bits(bits: Mapping[str, int], numels: Mapping[str, int], group_size: int, with_meta: bool = True) -> float:
    """Parameter-weighted average bits over the linears named in `bits`."""
    total = sum(numels[n] for n in bits)
    weighted = sum(numels[n] * b for n, b in bits.items())
    avg = weighted / total
    return avg + meta_overhead(group_size) if with_meta else avg


@dataclass(frozen=True)
class BitConfig:
    """Bits per linear layer, keyed by module name (as in `model.named_modules()`)."""

    bits: Mapping[str, int]
    group_size: int
    version: int = field(default=BITCONFIG_VERSION)

    def key(self) -> tuple:
        """The bits as a hashable value: one configuration, one key (archives, confirmations, the finalize stage)."""
        return tuple(sorted(self.bits.items()))

    def to_dict(self) -> dict:
        return {"version": self.version, "group_size": self.group_size, "bits": dict(self.bits)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "BitConfig":
        version = int(d.get("version", 0))
        if version != BITCONFIG_VERSION:
            raise ValueError(f"bit config version {version} is not supported (expected {BITCONFIG_VERSION})")
        return cls(bits={str(k): int(v) for k, v in d["bits"].items()}, group_size=int(d["group_size"]))
