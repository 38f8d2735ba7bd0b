"""GPT-2-style `Conv1D` layers as `nn.Linear`.

transformers' `Conv1D` (GPT-2 and its relatives) is a linear layer stored transposed: weight
[in, out], output x @ W + b. Replacing each by an `nn.Linear` holding W^T computes the same
outputs and lets every stage that works on `nn.Linear` (proxy, calibration, packed export) search
and quantize it.
"""

from __future__ import annotations

import logging

from torch import nn
from transformers.pytorch_utils import Conv1D

log = logging.getLogger(__name__)


def linear_from_conv1d(conv: Conv1D) -> nn.Linear:
    """An `nn.Linear` computing what `conv` computes (its weight transposed, same dtype and device)."""
    in_features, out_features = conv.weight.shape
    layer = nn.Linear(in_features, out_features, bias=conv.bias is not None, device="meta")
    layer.weight = nn.Parameter(conv.weight.detach().t().contiguous(), requires_grad=False)
    if conv.bias is not None:
        layer.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
    return layer


def conv1d_as_linear(model: nn.Module) -> int:
    """Replace every `Conv1D` of `model` by an equivalent `nn.Linear`; returns how many."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, Conv1D)]
    for name, conv in convs:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear_from_conv1d(conv))
    if convs:
        log.info("%d Conv1D layers as nn.Linear (their weights transposed)", len(convs))
    return len(convs)
