"""Bring a loaded model into the form every stage works on: its weight matrices as `nn.Linear`.

Applied once where a model is loaded (`amq.modeling.loading`) and again where a saved quantized
model is rebuilt (`amq.quantizers.export.load_quantized`), so module names agree between the
search, the finalize stage and the reload. A dense Llama-style model is left as it is.
"""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from amq.modeling.conv1d import conv1d_as_linear
from amq.modeling.experts import is_fused_experts, unfuse_experts


def as_linear_layers(model: nn.Module, check: bool = True) -> dict[str, int]:
    """Fused mixture-of-experts tensors and Conv1D layers become `nn.Linear` layers; returns how
    many modules of each kind changed. `check=False` for a model whose weights are not set yet."""
    return {"experts": unfuse_experts(model, check=check), "conv1d": conv1d_as_linear(model)}


def needs_linear_layers(model: nn.Module) -> bool:
    """Would `as_linear_layers` change this model (e.g. one built on the meta device from a config)?"""
    return any(is_fused_experts(m) or isinstance(m, Conv1D) for m in model.modules())
