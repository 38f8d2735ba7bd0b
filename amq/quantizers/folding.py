"""Where a linear's per-input-channel scale can be folded: the module whose output it reads.

AWQ multiplies a linear's weight by a per-input-channel scale s and divides its input by s. A
format that stores only quantized weights (compressed-tensors) cannot hold the division, so it
has to move into the module that produces the input: a norm (`w / s`, or `(1 + w) / s - 1` for
Gemma's offset norms), or a linear whose output rows reach this input channel for channel (v_proj
before o_proj in multi-head attention, up_proj before down_proj through the gated activation).

Which module that is depends on the architecture. Rather than a table per architecture, this
finds it by experiment on a few tokens: a candidate producer P of linear L is valid when dividing
P's output by a random positive s and multiplying L's input by the same s leaves the model's
logits unchanged (in float32). That single test covers what folding needs: P's output reaches L
elementwise, and reaches nothing else. Candidates are the module whose output tensor *is* L's
input (norms) and the linears of the same block, called before L, with as many outputs as L has
inputs. Each (producer, consumer) role is tested for all blocks at once, so the search costs a
handful of forward passes. Grouped-query attention (v_proj narrower than o_proj's input) and
fused projections (qkv_proj) have no valid producer: those linears are left unscaled, as the AWQ
reference leaves o_proj under grouped-query attention.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from amq.quantizers.grid import held_scale
from amq.quantizers.packed import GroupQuant

log = logging.getLogger(__name__)

PROBE_TOKENS = 32
TOLERANCE = 1e-3  # max |logit change| / max |logit| in float32 for a valid fold; a wrong one moves them by O(1)


@dataclass(frozen=True)
class Producer:
    """The module whose output a linear reads: `kind` is "norm" (a 1-D weight) or "linear" (its output rows)."""

    name: str
    kind: str


def _out_features(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear) or type(module).__name__ == "PackedLinear":
        return int(module.out_features)
    return None


def _is_norm(module: nn.Module, width: int) -> bool:
    w = getattr(module, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() == 1 and w.numel() == width and not list(module.children())


@contextlib.contextmanager
def float32_parameters(model: nn.Module) -> Iterator[None]:
    """Run with every floating-point parameter in float32, then put the very same tensors back.

    Buffers are left alone: a packed layer's float16 scales must not be cast (a cast back to the
    model dtype would lose them); it dequantizes in float32 and follows the activation dtype.
    """
    saved = [(p, p.data) for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32]
    try:
        for p, data in saved:
            p.data = data.float()
        yield
    finally:
        for p, data in saved:
            p.data = data


def _probe(model: nn.Module) -> torch.Tensor:
    vocab = int(model.config.vocab_size)
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (1, PROBE_TOKENS), generator=g).to(next(model.parameters()).device)


def _logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens, use_cache=False).logits.float()


def _candidates(model: nn.Module, linears: list[str], tokens: torch.Tensor) -> dict[str, list[Producer]]:
    """Per linear, the possible producers of its input, norms first (found in one traced forward)."""
    block_names = sorted({_block(n) for n in linears})
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # id of an output tensor -> (module, the tensor, kept alive)
    order: list[str] = []
    source: dict[str, str | None] = {}
    handles = []

    def out_hook(name: str) -> Callable:
        def fn(module: nn.Module, args: tuple, out: object) -> None:
            if isinstance(out, torch.Tensor):
                outputs[id(out)] = (name, out)
            order.append(name)

        return fn

    def in_hook(name: str) -> Callable:
        def fn(module: nn.Module, args: tuple) -> None:
            if name not in source:
                hit = outputs.get(id(args[0]))
                source[name] = hit[0] if hit is not None and hit[1] is args[0] else None

        return fn

    wanted = set(linears)
    for bname in block_names:
        for sub, module in model.get_submodule(bname).named_modules():
            if sub:
                full = f"{bname}.{sub}"
                handles.append(module.register_forward_hook(out_hook(full)))
                if full in wanted:
                    handles.append(module.register_forward_pre_hook(in_hook(full)))
    try:
        _logits(model, tokens)
    finally:
        for h in handles:
            h.remove()
    out: dict[str, list[Producer]] = {}
    for name in linears:
        width = int(model.get_submodule(name).in_features)
        found: list[Producer] = []
        norm = source.get(name)
        if norm is not None and _is_norm(model.get_submodule(norm), width):
            found.append(Producer(norm, "norm"))
        block = _block(name)
        if name in order:
            for other in dict.fromkeys(order[: order.index(name)]):
                if other.startswith(block + ".") and _out_features(model.get_submodule(other)) == width:
                    found.append(Producer(other, "linear"))
        out[name] = found
    return out


def _split(name: str) -> tuple[str, str]:
    """(block, name inside it): `model.layers.3.mlp.down_proj` -> (`model.layers.3`, `mlp.down_proj`).

    The block is the name up to its first numeric part (an entry of the decoder's ModuleList)."""
    parts = name.split(".")
    i = next((i for i, p in enumerate(parts) if p.isdigit()), len(parts) - 1)
    return ".".join(parts[: i + 1]), ".".join(parts[i + 1 :])


def _block(name: str) -> str:
    return _split(name)[0]


def _role(name: str) -> str:
    return _split(name)[1]


def _holds(model: nn.Module, pairs: list[tuple[str, str]], tokens: torch.Tensor, reference: torch.Tensor) -> bool:
    """Does scaling each producer's output by 1/s and its consumer's input by s leave the logits alone?"""
    g = torch.Generator().manual_seed(1)
    scales: dict[str, torch.Tensor] = {}
    handles = []
    device = tokens.device
    for producer, consumer in pairs:
        width = int(model.get_submodule(consumer).in_features)
        if producer not in scales:
            scales[producer] = (0.5 + 1.5 * torch.rand(width, generator=g)).to(device)
            s = scales[producer]
            handles.append(model.get_submodule(producer).register_forward_hook(lambda m, a, o, s=s: o / s.to(o.dtype)))
        s = scales[producer]
        handles.append(model.get_submodule(consumer).register_forward_pre_hook(lambda m, a, s=s: (a[0] * s.to(a[0].dtype), *a[1:])))
    try:
        got = _logits(model, tokens)
    finally:
        for h in handles:
            h.remove()
    return bool((got - reference).abs().max() <= TOLERANCE * reference.abs().max())


@torch.no_grad()
def find_producers(model: nn.Module, linears: list[str]) -> dict[str, Producer]:
    """For each of `linears` whose input scale can be folded, the module to fold it into.

    Linears missing from the result have no such module (their input is computed, not produced
    channel for channel by one module, or also read elsewhere). The consumers of one norm (q/k/v)
    are tested together, since folding into it scales what all of them read. Costs one forward
    pass of `PROBE_TOKENS` tokens per candidate role, with the parameters in float32.
    """
    was_training = model.training
    model.eval()
    with float32_parameters(model):
        tokens = _probe(model)
        reference = _logits(model, tokens)
        candidates = _candidates(model, linears, tokens)
        readers: dict[str, list[str]] = {}  # norm -> every listed linear that reads its output
        for name, options in candidates.items():
            for p in options:
                if p.kind == "norm":
                    readers.setdefault(p.name, []).append(name)
        by_role: dict[str, list[str]] = {}
        for name in linears:
            by_role.setdefault(_role(name), []).append(name)
        found: dict[str, Producer] = {}
        for role, names in by_role.items():
            if all(n in found for n in names):
                continue
            options = {(_role(p.name), p.kind) for n in names for p in candidates[n]}
            for option in sorted(options, key=lambda o: (o[1] != "norm", o[0])):
                chosen = {n: p for n in names for p in candidates[n] if (_role(p.name), p.kind) == option}
                if len(chosen) != len(names):
                    continue
                for p in {p for p in chosen.values() if p.kind == "norm"}:
                    chosen.update({r: p for r in readers[p.name]})
                if _holds(model, [(p.name, n) for n, p in chosen.items()], tokens, reference):
                    found.update(chosen)
                    break
    model.train(was_training)
    roles = sorted({f"{_role(n)} <- {_role(p.name)}" for n, p in found.items()})
    log.info("input scales fold for %d of %d linears (%s)", len(found), len(linears), ", ".join(roles) or "none")
    return found


NORM_FORMS = ("scale", "offset")  # x * w (Llama, OPT, ...) and x * (1 + w) (Gemma)


def _multiplier(weight: torch.Tensor, form: str) -> torch.Tensor:
    """The per-channel factor a norm of `form` applies, in float32."""
    return weight.float() if form == "scale" else 1 + weight.float()


def _weight_for(multiplier: torch.Tensor, form: str) -> torch.Tensor:
    return multiplier if form == "scale" else multiplier - 1


def norm_probe(norm: nn.Module) -> torch.Tensor:
    """A fixed batch of random inputs of the norm's width, in its dtype and device, to check a fold on."""
    return torch.randn(4, norm.weight.numel(), generator=torch.Generator().manual_seed(0)).to(norm.weight)


def _factor(norm: nn.Module, form: str, device: torch.device) -> torch.Tensor:
    return _multiplier(norm.weight.detach(), form).to(device)


def norm_form(norm: nn.Module, probe: torch.Tensor) -> str:
    """Which of `NORM_FORMS` the norm computes, found by folding a random scale into it (`folded_norm`).
    Raises ValueError when neither reproduces its output divided by the scale."""
    s = 0.5 + torch.rand(probe.shape[-1], generator=torch.Generator().manual_seed(2))
    return folded_norm(norm, s, probe)[1]


@torch.no_grad()
def storable_scale(norm: nn.Module, form: str, scale: torch.Tensor) -> torch.Tensor:
    """The scale nearest `scale` whose fold the norm's weight dtype stores exactly.

    Why: folding s leaves the norm the factor m / s (m its own factor), stored as a weight of the
    norm's dtype. Gemma stores m - 1, and its norms have many factors near 0, where m / s - 1 sits
    next to -1: in bfloat16 (steps of 2^-8 there) such a factor is off by 5-40%, and the exported
    model no longer computes what amq measured (held-out perplexity 28.5 became 43.5 on Gemma-3-270M
    with AWQ at 4 bits). So AWQ picks from the scales whose folded weight rounds to itself:
    s' = m / stored(m / s). A factor that would round to 0 takes the smallest one the dtype holds;
    channels whose factor is 0 keep `scale` (they output 0 either way)."""
    dtype = norm.weight.dtype
    m = _factor(norm, form, scale.device)
    s = scale.float()
    stored = _multiplier(_weight_for(m / s, form).to(dtype), form)
    if form == "offset":  # 1 + w for the representable w nearest -1, on either side
        eps = torch.finfo(dtype).eps
        smallest = torch.where(m > 0, torch.full_like(m, eps / 2), torch.full_like(m, -eps))
        stored = torch.where((stored == 0) & (m != 0), smallest, stored)
    return torch.where((m != 0) & (stored != 0), m / stored, s)


FACTOR_TOLERANCE = 1e-2  # largest relative error of a folded norm factor an export accepts (bfloat16 rounds by 2^-9)


@torch.no_grad()
def factor_error(norm: nn.Module, form: str, scale: torch.Tensor, folded_weight: torch.Tensor) -> float:
    """The largest relative error, over channels with a non-zero factor, of the factor a folded
    weight stores against the one folding `scale` asks for (m / s)."""
    m = _factor(norm, form, scale.device)
    want = m / scale.float()
    live = m != 0
    if not bool(live.any()):
        return 0.0
    got = _multiplier(folded_weight, form).to(scale.device)
    return float(((got - want).abs() / want.abs())[live].max())


@torch.no_grad()
def folded_norm(norm: nn.Module, scale: torch.Tensor, probe: torch.Tensor) -> tuple[dict[str, torch.Tensor], str]:
    """The norm's parameters (by name) that divide its output by `scale`, checked on `probe`, and
    the norm's form (`NORM_FORMS`).

    The weight becomes `w / s` or, for offset norms (`x * (1 + w)`, Gemma), `(1 + w) / s - 1`,
    whichever reproduces output / s in float32; a bias (LayerNorm) becomes `b / s`; both are
    returned in the parameters' own dtype. Raises ValueError when neither form does (a norm that
    does not scale its output by its weight).
    """
    params = dict(norm.named_parameters(recurse=False))
    originals = {k: p.data for k, p in params.items()}
    s = scale.float().to(originals["weight"].device)
    x = probe.float()
    try:  # decided in float32, channel by channel: a few large factors must not hide a wrong form
        for k, p in params.items():
            p.data = originals[k].float()
        want = norm(x) / s
        folded: dict[str, torch.Tensor] = {}
        if "bias" in params:
            folded["bias"] = params["bias"].data = originals["bias"].float() / s
        for form in NORM_FORMS:
            folded["weight"] = _weight_for(_multiplier(originals["weight"], form) / s, form)
            params["weight"].data = folded["weight"]
            if torch.allclose(norm(x), want, rtol=1e-3, atol=1e-5 * float(want.abs().max())):
                return {k: t.to(originals[k].dtype) for k, t in folded.items()}, form
    finally:
        for k, p in params.items():
            p.data = originals[k]
    raise ValueError(f"{type(norm).__name__} does not scale its output by its weight")


def shared_scale(scales: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """The one scale all these consumers use, or None when they differ."""
    values = list(scales.values())
    return values[0] if all(torch.equal(values[0], v) for v in values[1:]) else None


def rows_divided(q: GroupQuant, s: torch.Tensor, dtype: torch.dtype) -> GroupQuant:
    """`q` with output row r divided by s[r], through its group scales, held in the model's `dtype`."""
    return dataclasses.replace(q, scale=held_scale(q.scale.float() / s.float()[:, None], dtype).half())


def fold_into_quantized_linears(model: nn.Module, quants: dict[str, GroupQuant], producers: Mapping[str, Producer]) -> list[str]:
    """Move input scales into the group scales of the quantized linear that produces each input
    (up_proj before down_proj, v_proj before o_proj), updating `quants`; returns the layers moved.

    Why: compressed-tensors has no input scale, so the export has to fold it anyway, and the folded
    group scale `scale / s` is a new rounding (on SmolLM2 it alone moved a held-out perplexity by
    1%). Folded here, with the new scale held in the model's dtype (`grid.held_scale`), amq's own
    model and its checkpoint hold the same weights, so eval.json is what the checkpoint gives.
    Left to the export: producers with a bias (a GroupQuant holds none) and readers of one
    producer with different scales (which the export refuses).
    """
    readers: dict[str, list[str]] = {}
    for name, q in quants.items():
        p = producers.get(name)
        if q.input_scale is not None and p is not None and p.kind == "linear" and p.name in quants:
            readers.setdefault(p.name, []).append(name)
    moved = []
    for producer, names in readers.items():
        s = shared_scale({n: quants[n].input_scale for n in names})
        module = model.get_submodule(producer)
        if s is None or getattr(module, "bias", None) is not None:
            continue
        quants[producer] = rows_divided(quants[producer], s, module.weight.dtype)
        for n in names:
            quants[n] = dataclasses.replace(quants[n], input_scale=None)
        moved += names
    return moved
