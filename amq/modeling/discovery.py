"""Find the decoder blocks and their linear layers from the model itself (no shape tables).

The decoder stack is the longest `nn.ModuleList` whose entries are all of one class and contain
`nn.Linear` layers; this covers the Llama, Mistral, Qwen2, OPT and Gemma3 layouts (and most other
causal LMs in transformers) without naming any of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from amq.errors import InvalidArgument


@dataclass(frozen=True)
class LinearInfo:
    """One quantizable linear: its module name, block index, role within the block and shape."""

    name: str
    block: int
    role: str
    in_features: int
    out_features: int

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class ModelLayout:
    blocks_name: str
    n_blocks: int
    linears: tuple[LinearInfo, ...]

    @property
    def names(self) -> list[str]:
        return [li.name for li in self.linears]

    @property
    def numels(self) -> dict[str, int]:
        return {li.name: li.numel for li in self.linears}


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return (qualified name, ModuleList) of the decoder block stack."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        if not any(isinstance(m, nn.Linear) for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise InvalidArgument(
            "",
            f"{type(model).__name__} has no stack of decoder blocks with nn.Linear layers (GPT-2-style Conv1D layers are not searched yet)",
            "a causal LM whose decoder blocks hold nn.Linear layers: Llama, Mistral, Qwen2, Phi-3, OPT, Gemma3",
        )
    return best


def discover_layout(model: nn.Module) -> ModelLayout:
    """All `nn.Linear` layers inside the decoder blocks, in module order."""
    blocks_name, blocks = find_decoder_blocks(model)
    linears: list[LinearInfo] = []
    for i, block in enumerate(blocks):
        for sub, module in block.named_modules():
            if isinstance(module, nn.Linear):
                linears.append(
                    LinearInfo(
                        name=f"{blocks_name}.{i}.{sub}",
                        block=i,
                        role=sub,
                        in_features=module.in_features,
                        out_features=module.out_features,
                    )
                )
    return ModelLayout(blocks_name=blocks_name, n_blocks=len(blocks), linears=tuple(linears))


@dataclass(frozen=True)
class Coverage:
    """How much of the decoder's weight matrices (parameters of 2 or more dimensions inside the
    blocks) the searchable linears hold; `uncovered` names the rest (numel per parameter)."""

    covered: int
    total: int
    uncovered: dict[str, int] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return self.covered / self.total if self.total else 1.0


def coverage(model: nn.Module, layout: ModelLayout) -> Coverage:
    """What the search covers of the decoder: its nn.Linear weights, against every weight matrix
    in the blocks (fused 3-D expert tensors of mixture-of-experts models, routers, Conv1D are not)."""
    searched = {f"{name}.weight" for name in layout.names}
    blocks = model.get_submodule(layout.blocks_name)
    total, uncovered = 0, {}
    for name, param in blocks.named_parameters():
        if param.dim() < 2:
            continue
        full = f"{layout.blocks_name}.{name}"
        total += param.numel()
        if full not in searched:
            uncovered[full] = param.numel()
    return Coverage(total - sum(uncovered.values()), total, uncovered)
