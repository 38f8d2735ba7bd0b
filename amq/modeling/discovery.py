"""Find the decoder blocks and their linear layers from the model itself (no shape tables).

The decoder stack is the longest `nn.ModuleList` whose entries are all of one class and contain
`nn.Linear` layers, not nested in another such list; this covers the Llama, Mistral, Qwen2, OPT,
Gemma3 and (once `amq.modeling.normalize` has run) mixture-of-experts and GPT-2 layouts without
naming any of them.

Inside a block, a nested list of that kind holds experts: its linears carry their expert index.
Linears beside such a list with at most one output per expert are routers (Mixtral's `gate` in
older layouts, Qwen2-MoE's `shared_expert_gate`): they decide which weights run and are a
fraction of a percent of the weights, so they stay in 16 bits and are not searched.
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
    expert: int | None = None  # index within its layer's experts (mixture-of-experts models)

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features

    @property
    def projection(self) -> str:
        """The role with its expert index as `*`: what one projection of every expert of a layer shares."""
        if self.expert is None:
            return self.role
        parts = self.role.split(".")
        parts[parts.index(str(self.expert))] = "*"
        return ".".join(parts)


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
    lists = _linear_lists(model)
    outer = [(n, m) for n, m in lists if not any(n.startswith(f"{o}.") for o, _ in lists)]
    if not outer:
        raise InvalidArgument(
            "",
            f"{type(model).__name__} has no stack of decoder blocks with nn.Linear layers",
            "a causal LM whose decoder blocks hold linear layers: Llama, Mistral, Qwen2/3, Gemma, Phi-3, OPT, GPT-2, Falcon, GPT-NeoX, Mixtral, Qwen-MoE",
        )
    return max(outer, key=lambda item: len(item[1]))


def _linear_lists(module: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every non-empty `nn.ModuleList` of one class whose entries hold `nn.Linear` layers."""
    return [
        (name, m)
        for name, m in module.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(e) for e in m}) == 1 and any(isinstance(x, nn.Linear) for x in m[0].modules())
    ]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _experts_and_routers(block: nn.Module) -> tuple[dict[str, int], set[str]]:
    """Within a block: {linear name: expert index} for linears in expert lists, and router names."""
    experts: dict[str, int] = {}
    routers: set[str] = set()
    for list_name, lst in _linear_lists(block):
        for e, expert in enumerate(lst):
            for sub, m in expert.named_modules():
                if isinstance(m, nn.Linear):
                    experts[_join(f"{list_name}.{e}", sub)] = e
        parent_name = list_name.rpartition(".")[0]
        parent = block.get_submodule(parent_name) if parent_name else block
        for child, m in parent.named_children():
            if isinstance(m, nn.Linear) and m.out_features <= len(lst):
                routers.add(_join(parent_name, child))
    return experts, routers


def discover_layout(model: nn.Module) -> ModelLayout:
    """All `nn.Linear` layers inside the decoder blocks, in module order, routers left out."""
    blocks_name, blocks = find_decoder_blocks(model)
    linears: list[LinearInfo] = []
    for i, block in enumerate(blocks):
        experts, routers = _experts_and_routers(block)
        for sub, module in block.named_modules():
            if isinstance(module, nn.Linear) and sub not in routers:
                linears.append(
                    LinearInfo(
                        name=f"{blocks_name}.{i}.{sub}",
                        block=i,
                        role=sub,
                        in_features=module.in_features,
                        out_features=module.out_features,
                        expert=experts.get(sub),
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
    """What the search covers of the decoder: its searched linears' weights, against every weight
    matrix in the blocks (routers are not searched; fused experts left fused would not be)."""
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
