"""HQQ as the final quantizer: the proxy's quantizer, with its codes kept packed for real."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from amq.finalize.packed import GroupQuant
from amq.modeling.discovery import ModelLayout
from amq.proxy.hqq_quantizer import HQQQuantizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HQQFinal:
    """Calibration-free; `optimize` as in the proxy (HQQ's half-quadratic zero/scale refinement)."""

    optimize: bool = True
    name: str = "hqq"
    needs_calibration: bool = False

    def quantize(self, model: nn.Module, layout: ModelLayout, bits: Mapping[str, int], group_size: int,
                 calib: torch.Tensor | None = None) -> dict[str, GroupQuant]:
        hqq = HQQQuantizer(group_size=group_size, axis=1, optimize=self.optimize)
        out = {}
        for name, b in bits.items():
            w = model.get_submodule(name).weight.detach()
            w_q, meta = hqq.quantize(w, b, bitpack=False)
            out[name] = GroupQuant(
                codes=w_q.reshape(w.shape).to(torch.uint8),
                scale=meta["scale"].reshape(w.shape[0], -1).to(torch.float16),
                zero=meta["zero"].reshape(w.shape[0], -1).to(torch.float16),
                bits=b, group_size=group_size,
            )
        return out
