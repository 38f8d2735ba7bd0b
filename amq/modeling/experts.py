"""Mixture-of-experts weights as one `nn.Linear` per expert and projection.

transformers 5 stores a layer's experts as fused 3-D parameters (`experts.gate_up_proj` of shape
[experts, 2 x intermediate, hidden], `experts.down_proj` [experts, hidden, intermediate]) and
multiplies them in its own loop, so nothing that works on `nn.Linear` layers (the proxy bank, the
calibration hooks of GPTQ/AWQ, the packed export) would see them. `unfuse_experts` replaces each
such module by `ExpertLinears`: a list of experts, each holding `gate_up_proj` (or `up_proj`) and
`down_proj` as `nn.Linear`, with the forward transformers' experts implementations share
(`transformers.integrations.moe`: the gate function of the original class, optional biases,
transposed storage). Module names then read `...mlp.experts.3.gate_up_proj`, the layout older
checkpoints with one `nn.Linear` per expert already have, and both layouts take the same path.

The result is checked, not assumed: the first module of each experts class is run before and
after on random tokens and routing in float32; a class whose output differs (a forward this
module does not reproduce) is left fused, and the coverage check refuses the model.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

_FLAGS = ("has_gate", "has_bias", "is_transposed")  # set on every experts class by transformers' use_experts_implementation
TOLERANCE = 1e-4  # of the largest output, in float32


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts module holding its weights as 3-D tensors."""
    down = getattr(module, "down_proj", None)
    return isinstance(down, nn.Parameter) and down.dim() == 3 and all(hasattr(module, f) for f in _FLAGS)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> nn.Linear:
    w = weight.t() if transposed else weight
    layer = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(w.detach().clone().contiguous(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return layer


class Expert(nn.Module):
    """One expert's projections: `gate_up_proj` (or `up_proj` without a gate) and `down_proj`."""

    def __init__(self, up: nn.Linear, down: nn.Linear, gated: bool) -> None:
        super().__init__()
        self.up_name = "gate_up_proj" if gated else "up_proj"
        self.add_module(self.up_name, up)
        self.down_proj = down

    @property
    def up(self) -> nn.Module:
        return getattr(self, self.up_name)


class ExpertLinears(nn.ModuleList):
    """A layer's experts as `nn.Linear` layers, computing what the fused module computed.

    Called like transformers' experts modules: (hidden_states [tokens, hidden], top_k_index and
    top_k_weights [tokens, k]). Each expert sees only the tokens routed to it, so calibration
    hooks on its linears collect exactly its own inputs.
    """

    def __init__(self, fused: nn.Module) -> None:
        gated, biased, transposed = (bool(getattr(fused, f)) for f in _FLAGS)
        up = fused.gate_up_proj if gated else fused.up_proj
        up_bias = getattr(fused, "gate_up_proj_bias" if gated else "up_proj_bias", None) if biased else None
        down_bias = fused.down_proj_bias if biased else None
        super().__init__(
            Expert(
                _linear(up[e], None if up_bias is None else up_bias[e], transposed),
                _linear(fused.down_proj[e], None if down_bias is None else down_bias[e], transposed),
                gated,
            )
            for e in range(up.shape[0])
        )
        self.gated = gated
        # The gate function and activation stay on the original object (parameters removed); it
        # is kept unregistered so the module tree and the state dict hold only the linears.
        object.__setattr__(self, "_gating", fused)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        gating = self._gating
        for e in torch.unique(top_k_index).tolist():
            if not 0 <= e < len(self):  # expert-parallel sentinels
                continue
            token, slot = torch.where(top_k_index == e)
            expert = self[e]
            h = expert.up(hidden_states[token])
            h = gating._apply_gate(h) if self.gated else gating.act_fn(h)
            h = expert.down_proj(h) * top_k_weights[token, slot, None]
            out.index_add_(0, token, h.to(out.dtype))
        return out


def _strip(fused: nn.Module) -> bool:
    """Remove the fused tensors; False if anything else with weights is left (a post-expert norm)."""
    for name in ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj_bias"):
        if isinstance(getattr(fused, name, None), nn.Parameter):
            delattr(fused, name)
    return not any(True for _ in fused.parameters()) and not any(True for _ in fused.buffers())


@torch.no_grad()
def _reproduces(fused: nn.Module, unfused: ExpertLinears, seed: int = 0) -> bool:
    """Does `unfused` compute what `fused` computes? Random tokens and routing, in float32."""
    gen = torch.Generator().manual_seed(seed)
    n_experts, hidden = len(unfused), unfused[0].up.in_features
    tokens, k = 4 * n_experts, min(2, n_experts)
    x = torch.randn(tokens, hidden, generator=gen)
    index = torch.stack([torch.randperm(n_experts, generator=gen)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=gen)
    dtype, device = fused.down_proj.dtype, fused.down_proj.device
    try:
        fused.float(), unfused.float()
        expected = fused(x.to(device), index.to(device), weights.to(device))
        got = unfused(x.to(device), index.to(device), weights.to(device))
    finally:
        fused.to(dtype), unfused.to(dtype)
    return bool((expected - got).abs().max() <= TOLERANCE * max(float(expected.abs().max()), 1e-6))


def unfuse_experts(model: nn.Module, check: bool = True) -> int:
    """Replace every fused experts module of `model` by `ExpertLinears`; returns how many.

    With `check`, classes whose forward `ExpertLinears` does not reproduce are left as they are
    (logged). Without it (a model rebuilt to receive saved weights, its values not yet set), every
    fused module is replaced.
    """
    fused = [(n, m) for n, m in model.named_modules() if is_fused_experts(m)]
    checked: dict[type, bool] = {}
    replaced = 0
    for name, module in fused:
        unfused = ExpertLinears(module)
        cls = type(module)
        if cls not in checked:
            checked[cls] = not check or module.down_proj.device.type == "meta" or _reproduces(module, unfused)
            if not checked[cls]:
                log.warning("%s: its forward is not the one amq reproduces with per-expert linears; left fused", cls.__name__)
        if not checked[cls] or not _strip(module):
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, unfused)
        replaced += 1
    if replaced:
        log.info("mixture of experts: %d expert modules as per-expert linears (%d experts each)", replaced, len(unfused))
    return replaced
