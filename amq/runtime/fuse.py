"""Sibling projections that read the same input, multiplied as one layer (q/k/v, gate/up).

Why: at batch-1 decoding a product costs its bytes plus a fixed part (launch, ramp-up, the tail of
the last wave), and the fixed part weighs most on the smaller layers. q, k and v (and gate and up)
multiply the same activations, so when they share a width, group size and tile their bit planes
can be stacked row-wise into one layer: one launch instead of three, over a taller weight that
fills the GPU better. The members' planes are rows of the stacked ones, so the model holds no copy.

Each member becomes a `SiblingLinear` that asks its `SiblingGroup` for its rows of the stacked
product. The group computes the product once per input and hands out slices (views, no copy) until
every member has taken its own; a member called with another input (or the same tensor changed in
place) gets a fresh product, so a model that calls the members on different inputs stays right,
only without the saving (under torch.compile only identity is checked; `SiblingGroup._fresh`).
Which children are siblings is named per architecture family in `SIBLINGS`. Within a set, the
members that share a width (and group size, tile, input scale) are stacked together, so a q/k/v set
at 3/3/4 bits takes two launches instead of three; a member no other shares stays as it is, and a
set with a child missing is left alone. A search with `search=amq_fused` gives siblings one width,
so every set of its configurations stacks whole.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from amq.runtime.layout import split_workspace
from amq.runtime.linear import PlanesLinear

log = logging.getLogger(__name__)

# Child names that multiply one input, in the order the stacked rows take: attention and MLP of
# Llama, Mistral, Qwen2/3, Gemma 1-3 and OLMo, and Mixtral's experts (w1, w3). Phi-3, GPT-2, Falcon
# and GPT-NeoX hold these projections as one layer already.
SIBLINGS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


def _key(layer: PlanesLinear) -> tuple:
    """What members must share to be stacked: the kernel geometry and the dtypes and devices."""
    return (
        layer.in_features,
        layer.bits,
        layer.group_size,
        layer.tile,
        layer.gemm_max_rows,
        layer.scale.dtype,
        layer.scale.device,
        layer.input_scale is None,
        layer.bias is None,
    )


def stackable_subsets(layers: Sequence[nn.Module]) -> list[list[int]]:
    """Indices of `layers` grouped into the subsets that `stackable` allows (two members or more),
    in order: the members of one width and geometry stack together."""
    subsets: list[list[int]] = []
    for i, layer in enumerate(layers):
        home = next((g for g in subsets if stackable([layers[g[0]], layer])), None)
        if home is None:
            subsets.append([i])
        else:
            home.append(i)
    return [g for g in subsets if len(g) > 1]


def stackable(layers: Sequence[nn.Module]) -> bool:
    """True when every layer is a `PlanesLinear` and all share geometry and input scale."""
    if len(layers) < 2 or not all(type(m) is PlanesLinear for m in layers):
        return False
    first = layers[0]
    if any(_key(m) != _key(first) for m in layers[1:]):
        return False
    return first.input_scale is None or all(torch.equal(m.input_scale, first.input_scale) for m in layers[1:])


class SiblingGroup(nn.Module):
    """The stacked layer of a sibling set and the one product it shares among its members."""

    def __init__(self, stacked: PlanesLinear, sizes: Sequence[int]) -> None:
        super().__init__()
        self.stacked = stacked
        self.bounds = [(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(len(sizes))]
        self._input: torch.Tensor | None = None
        self._version = -1
        self._output: torch.Tensor | None = None
        self._taken: set[int] = set()

    def _fresh(self, x: torch.Tensor, index: int) -> bool:
        if self._input is not x or index in self._taken:
            return False
        # torch.compile does not trace version counters: there only identity is checked, so an
        # in-place change of the input between two members' calls would go unseen (no Hugging Face
        # block makes one)
        return torch.compiler.is_compiling() or x._version == self._version

    def rows(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Member `index`'s output for `x`: its columns of the stacked product (a view)."""
        if not self._fresh(x, index):
            self._input, self._output, self._taken = x, self.stacked(x), set()
            if not torch.compiler.is_compiling():
                self._version = x._version
        start, stop = self.bounds[index]
        y = self._output[..., start:stop]
        self._taken.add(index)
        if len(self._taken) == len(self.bounds):  # every member served: let the tensors go
            self._input, self._output, self._taken = None, None, set()
        return y


class SiblingLinear(nn.Module):
    """One member of a sibling set: rows `bounds[index]` of its group's stacked layer."""

    def __init__(self, group: SiblingGroup, index: int) -> None:
        super().__init__()
        object.__setattr__(self, "group", group)  # owned by the parent module, not by each member
        self.index = index
        start, stop = group.bounds[index]
        self.in_features, self.out_features = group.stacked.in_features, stop - start
        self.bits, self.group_size = group.stacked.bits, group.stacked.group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.rows(x, self.index)

    def extra_repr(self) -> str:
        start, stop = self.group.bounds[self.index]
        return f"rows {start}:{stop} of a stacked {self.bits}-bit layer, in_features={self.in_features}"


def stack(layers: Sequence[PlanesLinear], workspace: tuple[torch.Tensor, torch.Tensor] | None = None) -> PlanesLinear:
    """One `PlanesLinear` whose rows are `layers`' rows in order (`stackable` must hold)."""
    first = layers[0]
    out = PlanesLinear.__new__(PlanesLinear)
    nn.Module.__init__(out)
    out.in_features, out.out_features = first.in_features, sum(m.out_features for m in layers)
    out.bits, out.group_size, out.gemm_max_rows, out.tile = first.bits, first.group_size, first.gemm_max_rows, first.tile
    planes = [torch.cat(rows) for rows in zip(*(m.planes() for m in layers))]
    bias = None if first.bias is None else torch.cat([m.bias for m in layers])
    out.hold(planes, torch.cat([m.scale for m in layers]), torch.cat([m.zero for m in layers]), first.input_scale, bias, workspace)
    return out


def fuse_siblings(model: nn.Module, siblings: Sequence[Sequence[str]] = SIBLINGS) -> list[str]:
    """Stack the members of every sibling set of `PlanesLinear` children that `stackable` allows
    together (the whole set, or its members of one width: `stackable_subsets`), in place.

    The stacked layer goes on the parent as `<first>_<last>_stacked` after its first and last
    member (e.g. `q_proj_v_proj_stacked`) and each member is replaced by a `SiblingLinear`; the
    members' own planes are freed. Sets on one device share one split-K scratch sized for the
    tallest stack. Returns the names of the stacked layers."""
    found: list[tuple[nn.Module, str, tuple[str, ...], list[PlanesLinear]]] = []
    for name, parent in model.named_modules():
        for names in siblings:
            layers = [getattr(parent, n, None) for n in names]
            if any(m is None for m in layers):
                continue
            for subset in stackable_subsets(layers):
                found.append((parent, name, tuple(names[i] for i in subset), [layers[i] for i in subset]))
    rows: dict[torch.device, int] = {}
    for *_, layers in found:
        device = layers[0].scale.device
        rows[device] = max(rows.get(device, 0), sum(m.out_features for m in layers))
    workspaces = {device: split_workspace(n, device) for device, n in rows.items()}
    stacked_names = []
    for parent, name, names, layers in found:
        group = SiblingGroup(stack(layers, workspaces[layers[0].scale.device]), [m.out_features for m in layers])
        attr = f"{names[0]}_{names[-1]}_stacked"
        setattr(parent, attr, group)
        for i, n in enumerate(names):
            setattr(parent, n, SiblingLinear(group, i))
        stacked_names.append(f"{name}.{attr}" if name else attr)
    log.info("stacked %d sibling sets (or their members of one width) of bit-plane layers", len(stacked_names))
    return stacked_names
