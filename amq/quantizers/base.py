"""The two roles a weight quantizer plays, as protocols.

A `WeightQuantizer` is the search's proxy: it quantizes one weight at one width, calibration-free,
and its dequantized result is swapped into the model for a true evaluation (amq.proxy.bank). A
`FinalQuantizer` produces the exported model: it quantizes every selected linear of a model at
its width (with calibration windows where the method needs them) and returns packed `GroupQuant`s
(amq.quantizers.packed) that every format stores the same way.
"""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from typing import Any, Mapping, Protocol

import torch
from torch import nn

from amq.modeling.discovery import ModelLayout
from amq.quantizers.packed import GroupQuant


class WeightQuantizer(Protocol):
    name: str

    def settings(self) -> dict: ...

    def quantize(self, weight: torch.Tensor, nbits: int) -> tuple[torch.Tensor, dict]: ...

    def dequantize(self, w_q: torch.Tensor, meta: dict) -> torch.Tensor: ...

    def dequantize_into(self, out: torch.Tensor, w_q: torch.Tensor, meta: dict) -> None: ...


class FinalQuantizer(Protocol):
    name: str
    needs_calibration: bool

    def quantize(
        self, model: nn.Module, layout: ModelLayout, bits: Mapping[str, int], group_size: int, calib: torch.Tensor | None
    ) -> dict[str, GroupQuant]: ...


def quantizer_info(q: FinalQuantizer) -> dict[str, Any]:
    """A final quantizer's name and settings, as recorded with every exported model."""
    return {"name": q.name, **(asdict(q) if is_dataclass(q) else {})}
