"""Find the decoder blocks and their linear layers from the model itself (no shape tables).

The decoder stack is the longest `nn.ModuleList` whose entries are all of one class and contain
`nn.Linear` layers; this covers the Llama, Mistral, Qwen2, OPT and Gemma3 layouts (and most other
causal LMs in transformers) without naming any of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


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
        raise ValueError(f"could not find a stack of decoder blocks with nn.Linear layers in {type(model).__name__}")
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
