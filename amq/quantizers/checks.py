"""The checks every final quantizer makes before working: names, widths, group size, calibration."""

from __future__ import annotations

from typing import Mapping

import torch

from amq.errors import InvalidArgument
from amq.modeling.discovery import LinearInfo, ModelLayout


def selected_linears(
    layout: ModelLayout, bits: Mapping[str, int], group_size: int, finalizer: str, supported_bits: tuple[int, ...] = tuple(range(1, 9))
) -> list[LinearInfo]:
    """The layout's linears named in `bits`, after checking names, widths and the group size."""
    by_name = {li.name: li for li in layout.linears}
    unknown = [n for n in bits if n not in by_name]
    if unknown:
        raise InvalidArgument("bits", f"{len(unknown)} names are not decoder linears of the model, e.g. {unknown[0]!r}", "names from the model's layout")
    for name, b in bits.items():
        if b not in supported_bits:
            raise InvalidArgument("bits", f"{name}: {b}-bit is not a width {finalizer} packs", ", ".join(map(str, supported_bits)))
    if group_size < 1:
        raise InvalidArgument("group_size", f"{group_size}", "a positive divisor of every layer's input features")
    chosen = [by_name[n] for n in bits]
    for li in chosen:
        if li.in_features % group_size:
            raise InvalidArgument(
                "group_size", f"{group_size} does not divide {li.name} (in_features={li.in_features})", "a divisor of every quantized layer's input features"
            )
    return chosen


def require_calibration(calib: torch.Tensor | None, finalizer: str) -> torch.Tensor:
    """The calibration windows, checked: a (n, seq_len) integer tensor."""
    if calib is None:
        raise InvalidArgument(
            "calib", f"{finalizer} needs calibration windows and none were given", "calibration token windows, or finalizer=hqq (calibration-free)"
        )
    if calib.dim() != 2 or calib.dtype != torch.long or calib.numel() == 0:
        raise InvalidArgument("calib", f"calibration must be a non-empty (n, seq_len) LongTensor, got {tuple(calib.shape)} {calib.dtype}")
    return calib
