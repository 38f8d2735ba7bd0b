"""AWQ (Lin et al., 2024, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration"), implemented in torch from the paper.

Input channels that see large activations matter most, so each linear's weight is scaled up per
input channel by s = mean|x|^alpha before round-to-nearest and scaled back afterwards; alpha is
grid-searched in [0, 1] (alpha = 0 is plain round-to-nearest, so the search never does worse than
it on the calibration data). Then, optionally, each group's range is shrunk (clipped) where that
lowers the output error. Both searches minimise the layer's output error on the calibration
inputs, computed exactly from H = 2 X X^T as trace(E H E^T) for a weight error E, which costs the
same whatever the number of calibration tokens. Blocks are walked in order and each sees the
quantized outputs of the previous one (`amq.quantizers.calibration`).

With `fold=True` (the default) the linears that read one input (q/k/v, gate/up) share one
scale, searched on their summed output error as the reference does, and only linears whose input
scale can move into the module producing that input (a norm, or up_proj before down_proj; see
`amq.quantizers.folding`) are scaled; the others (o_proj under grouped-query attention, the fused
projections of Phi-3) keep alpha = 0 and get only the clipping search. That is what lets a
standard format without input scales (compressed-tensors) hold the model: the export folds each
shared scale into its producer norm, and scales whose producer is a quantized linear are folded
into its group scales here already (`folding.fold_into_quantized_linears`), so that amq's model
and the checkpoint are the same. `fold=False` scales every linear with its own scale, which only
amq's own format can hold (each layer keeps `input_scale` and computes `dequant @ (x / s)`).

Why not a library: AutoAWQ 0.2.9 (archived) imports here but packs 4-bit only ("Only 4-bit are
supported for now") and one width for the whole model; llm-compressor 0.14 pins transformers
<= 5.17, below the 5.23 this project uses. See `amq.quantizers.gptq` for the GPTQ libraries.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Callable, Mapping

import torch
from torch import nn

from amq.errors import InvalidArgument
from amq.modeling.discovery import ModelLayout
from amq.quantizers.calibration import InputStats, quantize_calibrated
from amq.quantizers.checks import selected_linears
from amq.quantizers.folding import Producer, find_producers, fold_into_quantized_linears, norm_form, norm_probe, storable_scale
from amq.quantizers.grid import GridForm, from_codes, grouped, round_to_nearest, search_shrink, shrink_ratios
from amq.quantizers.packed import GroupQuant

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AWQFinalizer:
    """AWQ with per-layer bits: `n_grid` points for alpha in [0, 1] and for the clipping ratio in [max_shrink, 1].

    `fold`: scales shared by the linears of one input and limited to those a standard checkpoint
    can hold (module docstring); False: a free scale per linear (amq's own format only).
    `integer_zero`: zero points rounded to whole codes before the weights are (`grid.minmax_grid`),
    so the compressed-tensors export bit-packs every layer (`pack-quantized`, what vLLM serves).
    """

    n_grid: int = 20
    clip: bool = True
    max_shrink: float = 0.5
    sequential: bool = True
    batch_size: int = 8
    fold: bool = True
    integer_zero: bool = False
    name: str = "awq"
    needs_calibration: bool = True

    def __post_init__(self) -> None:
        if self.n_grid < 2:
            raise InvalidArgument("n_grid", f"{self.n_grid}", "an integer >= 2 (the reference uses 20)")
        if not 0.0 < self.max_shrink <= 1.0:
            raise InvalidArgument("max_shrink", f"{self.max_shrink}", "0 < max_shrink <= 1 (the reference uses 0.5)")
        if self.batch_size < 1:
            raise InvalidArgument("batch_size", f"{self.batch_size}", "a positive integer")

    def quantize(self, model: nn.Module, layout: ModelLayout, bits: Mapping[str, int], group_size: int, calib: torch.Tensor | None) -> dict[str, GroupQuant]:
        producers, readers = None, {}  # None: every linear may be scaled
        if self.fold:
            names = [li.name for li in selected_linears(layout, bits, group_size, self.name)]
            producers = find_producers(model, names)
            for n, p in producers.items():
                readers.setdefault(p.name, set()).add(n)

        def stage_options(names: list[str]) -> dict:
            """Scaled when one shared scale can move into the producer: every linear of the stage has
            one, and the stage is all that reads it (Falcon's parallel attention and MLP read one
            norm in two stages, which would give it two scales); into a norm, only scales whose
            folded weight its dtype stores exactly (`storable_scale`)."""
            if producers is None:
                return {"scaled": True}
            scaled = all(n in producers and readers[producers[n].name] == set(names) for n in names)
            return {"scaled": scaled, "snap": _norm_snap(model, producers[names[0]]) if scaled else None}

        quants = quantize_calibrated(self, model, layout, bits, group_size, calib, stage_options)
        if producers is not None:  # the checkpoint's folds into quantized linears, made here (why: `fold_into_quantized_linears`)
            moved = fold_into_quantized_linears(model, quants, producers)
            log.info("AWQ: the input scales of %d linears folded into the group scales of the linears before them", len(moved))
        return quants

    def quantize_stage(
        self,
        weights: list[torch.Tensor],
        bits: list[int],
        group_size: int,
        stats: InputStats,
        scaled: bool = True,
        snap: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> list[GroupQuant]:
        """One shared scale for the stage (`fold`), a scale per linear (not `fold`), or none (`scaled=False`)."""
        grid = {"n_grid": self.n_grid, "clip": self.clip, "max_shrink": self.max_shrink, "integer_zero": self.integer_zero}
        if self.fold:
            return awq_quantize_shared(weights, stats, bits, group_size, scaled=scaled, snap=snap, **grid)
        return [awq_quantize_shared([w], stats, [b], group_size, **grid)[0] for w, b in zip(weights, bits)]


def _norm_snap(model: nn.Module, producer: Producer) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """For a norm producer, the map from a scale to the nearest one it can absorb exactly; None for a linear."""
    if producer.kind != "norm":
        return None
    norm = model.get_submodule(producer.name)
    try:
        return partial(storable_scale, norm, norm_form(norm, norm_probe(norm)))
    except ValueError:  # not a weight-times-input norm: the export refuses the fold, naming it
        return None


def output_error(E: torch.Tensor, H: torch.Tensor) -> float:
    """trace(E H E^T): the summed squared output error of weight error E on inputs with Hessian H."""
    return float(((E @ H) * E).sum())


def awq_quantize_shared(
    weights: list[torch.Tensor],
    stats: InputStats,
    bits: list[int],
    group_size: int,
    n_grid: int = 20,
    clip: bool = True,
    max_shrink: float = 0.5,
    scaled: bool = True,
    snap: Callable[[torch.Tensor], torch.Tensor] | None = None,
    integer_zero: bool = False,
) -> list[GroupQuant]:
    """AWQ of (out, in) weights that read one input, with one input scale shared by all of them.

    The scale minimises their summed output error, each at its own width. `scaled=False` keeps
    s = 1 (no input scale): round-to-nearest with the clipping search only. `snap` maps each
    candidate scale to the nearest one the input's producer can absorb (`storable_scale`).
    `integer_zero`: every grid's zero points are whole codes (`grid.GridForm`).
    """
    Ws = [w.detach().float() for w in weights]
    form = GridForm(weights[0].dtype, integer_zero)  # exact in what the model computes in (`grid.held_scale`)
    H = stats.hessian()
    best_s = None
    if scaled:
        x_mean = stats.mean_abs()
        best_err = float("inf")
        for alpha in torch.linspace(0.0, 1.0, n_grid).tolist():
            s = x_mean.pow(alpha).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            if snap is not None:
                s = snap(s)
            s = s.half().float()  # exactly what the layer stores
            err = 0.0
            for W, b in zip(Ws, bits):
                codes, scale, zero = round_to_nearest(W * s, b, group_size, form=form)
                W_eff = from_codes(grouped(codes, group_size), scale, zero).reshape(W.shape) / s
                err += output_error(W_eff - W, H)
            if err < best_err:
                best_err, best_s = err, s
    out = []
    for W, b in zip(Ws, bits):
        W_s = W * best_s if best_s is not None else W
        H_s = H / torch.outer(best_s, best_s) if best_s is not None else H
        shrink = clip_ratios(W_s, H_s, b, group_size, n_grid, max_shrink, form) if clip else 1.0
        codes, scale, zero = round_to_nearest(W_s, b, group_size, shrink, form)
        input_scale = best_s.half() if best_s is not None else None
        out.append(GroupQuant(codes.to(torch.uint8), scale.half(), zero.half(), b, group_size, input_scale=input_scale))
    return out


def clip_ratios(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int,
    n_grid: int,
    max_shrink: float,
    form: GridForm = GridForm(),
) -> torch.Tensor:
    """Per (row, group) range shrink in [max_shrink, 1] minimising that group's output error.

    A group's own error is e H_gg e^T with H_gg the group's diagonal block of H (cross-group terms
    are left out, as in the reference's per-group clipping search).
    """
    n_groups = W.shape[1] // group_size
    Hb = H.reshape(n_groups, group_size, n_groups, group_size).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (groups, G, G)

    def group_output_error(e: torch.Tensor) -> torch.Tensor:  # (C, out, groups, G) -> (C, out, groups)
        return (torch.einsum("...gi,gij->...gj", e, Hb) * e).sum(-1)

    return search_shrink(grouped(W, group_size), bits, shrink_ratios(n_grid, max_shrink), group_output_error, form=form)
