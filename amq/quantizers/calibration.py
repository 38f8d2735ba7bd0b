"""Walk the decoder blocks in order on calibration activations (shared by GPTQ and AWQ).

Both methods quantize a block from statistics of its linears' inputs and then feed the
*quantized* block's outputs to the next block, so later blocks learn to compensate for the
errors of earlier ones. One pass of the unquantized model records each block's call: the
hidden states entering block 0 and, for every block, the other arguments the model passes it
(attention mask, position embeddings). These are recorded per block, not reused from block 0,
because some architectures pass per-layer arguments (Gemma3's sliding-window layers get their
own mask and rotary tables). All work happens per block on the model's device, so a 7B model
needs one block's activations and statistics at a time, not the whole model's.

With `sequential=True` a block's linears are quantized in stages of linears that read the same
input (q/k/v, then o, then gate/up, then down in a Llama block), re-measuring the inputs of each
stage after the earlier stages have been quantized ("true sequential" in the GPTQ reference).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import torch
from torch import nn

from amq.modeling.discovery import LinearInfo, ModelLayout, find_decoder_blocks
from amq.quantizers.checks import require_calibration, selected_linears
from amq.quantizers.packed import GroupQuant

log = logging.getLogger(__name__)


@dataclass
class InputStats:
    """Running statistics of the inputs of one or more linears reading the same tensor."""

    xtx: torch.Tensor  # float32 (in, in): sum of x x^T over tokens
    abs_sum: torch.Tensor  # float32 (in,): sum of |x| over tokens
    count: int = 0

    @classmethod
    def empty(cls, in_features: int, device: torch.device) -> "InputStats":
        z = torch.zeros(in_features, dtype=torch.float32, device=device)
        return cls(torch.zeros(in_features, in_features, dtype=torch.float32, device=device), z)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.xtx.addmm_(x.T, x)
        self.abs_sum += x.abs().sum(dim=0)
        self.count += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """H = 2 X X^T / n, the Hessian of the layer's squared output error (GPTQ's definition)."""
        return self.xtx * (2.0 / self.count)

    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / self.count

    @classmethod
    def uncalibrated(cls, in_features: int, device: torch.device) -> "InputStats":
        """Statistics of white-noise inputs (X^T X = I, |x| = 1): for an expert no calibration
        token was routed to, GPTQ then rounds to nearest and AWQ leaves the inputs unscaled."""
        eye = torch.eye(in_features, dtype=torch.float32, device=device)
        return cls(eye, torch.ones(in_features, dtype=torch.float32, device=device), 1)


@dataclass
class _BlockCall:
    """How the model called one block, for one mini-batch: positional extras and keyword arguments."""

    args: tuple
    kwargs: dict[str, Any]


@dataclass
class _Recorder:
    """Forward hooks that group a block's linears into stages and accumulate each stage's inputs.

    A stage is the linears called one after another on the very same tensor object (q/k/v, or
    gate/up); they share one InputStats, so X^T X of their common input is accumulated once.
    Only the first `measure` stages are measured (None: all).
    """

    modules: Mapping[str, nn.Linear]
    measure: int | None = None
    stages: list[list[str]] = field(default_factory=list)
    stats: list[InputStats | None] = field(default_factory=list)  # None: stage not measured
    _stage_of: dict[str, int] = field(default_factory=dict)
    _last: tuple[torch.Tensor, int] | None = None

    def _hook(self, name: str) -> Callable:
        def fn(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0]
            k = self._stage_of.get(name)
            if k is None:
                if self._last is not None and self._last[0] is x:
                    k = self._last[1]
                    self.stages[k].append(name)
                else:
                    k = len(self.stages)
                    self.stages.append([name])
                    self.stats.append(InputStats.empty(x.shape[-1], x.device) if self.measure is None or k < self.measure else None)
                self._stage_of[name] = k
            stats = self.stats[k]
            if stats is not None and self.stages[k][0] == name:
                stats.add(x)
            self._last = (x, k)

        return fn

    def run(self, block: nn.Module, hidden: list[torch.Tensor], calls: list[_BlockCall]) -> "_Recorder":
        handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        try:
            for h, call in zip(hidden, calls):
                self._last = None
                run_block(block, h, call)
        finally:
            for hd in handles:
                hd.remove()
            self._last = None
        return self

    def stats_of(self, name: str) -> InputStats | None:
        """The statistics of the stage `name` was measured in (None: not called, or not measured)."""
        k = self._stage_of.get(name)
        return None if k is None else self.stats[k]

    @property
    def missing(self) -> list[str]:
        """Linears the block's forward never called (experts no token was routed to)."""
        return [n for n in self.modules if n not in self._stage_of]


def run_block(block: nn.Module, hidden: torch.Tensor, call: _BlockCall) -> torch.Tensor:
    out = block(hidden, *call.args, **call.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


class _StopForward(Exception):
    pass


def capture_block_calls(
    model: nn.Module, blocks: nn.ModuleList, calib: torch.Tensor, batch_size: int, last: int
) -> tuple[list[torch.Tensor], list[list[_BlockCall]]]:
    """Block 0's input hidden states per mini-batch, and every block's call (up to `last`) per mini-batch."""
    device = next(model.parameters()).device
    hidden: list[torch.Tensor] = []
    calls: list[list[_BlockCall]] = [[] for _ in range(last + 1)]

    def pre_hook(i: int) -> Callable:
        def fn(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if args:
                h, extra = args[0], tuple(args[1:])
            else:
                h, extra = kwargs["hidden_states"], ()
            if i == 0:
                hidden.append(h)
            calls[i].append(_BlockCall(extra, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
            if i == last:
                raise _StopForward

        return fn

    handles = [blocks[i].register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i in range(last + 1)]
    try:
        for s in range(0, len(calib), batch_size):
            try:
                model(input_ids=calib[s : s + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for hd in handles:
            hd.remove()
    return hidden, calls


class CalibratedFinalizer(Protocol):
    """A finalizer that quantizes a stage of linears from the statistics of their shared input."""

    name: str
    batch_size: int
    sequential: bool

    def quantize_stage(self, weights: list[torch.Tensor], bits: list[int], group_size: int, stats: InputStats, **options: Any) -> list[GroupQuant]: ...


def quantize_calibrated(
    finalizer: CalibratedFinalizer,
    model: nn.Module,
    layout: ModelLayout,
    bits: Mapping[str, int],
    group_size: int,
    calib: torch.Tensor | None,
    stage_options: Callable[[list[str]], dict[str, Any]] | None = None,
) -> dict[str, GroupQuant]:
    """`Finalizer.quantize` for calibrated methods: check the request, then walk the blocks.

    `stage_options(names)` gives extra keyword arguments for a stage's `quantize_stage` (AWQ: may
    this stage be scaled).
    """
    linears = selected_linears(layout, bits, group_size, finalizer.name)
    calib = require_calibration(calib, finalizer.name)

    def stage(names: list[str], weights: list[torch.Tensor], stats: InputStats) -> list[GroupQuant]:
        options = stage_options(names) if stage_options is not None else {}
        return finalizer.quantize_stage(weights, [bits[n] for n in names], group_size, stats, **options)

    return quantize_blocks(model, linears, calib, stage, finalizer.batch_size, finalizer.sequential, label=finalizer.name)


def _steps(stages: list[list[str]], projection: Mapping[str, str]) -> list[list[list[str]]]:
    """Stages grouped into steps whose inputs one re-run of the block measures together.

    A stage is a step of its own, except the experts' stages: the experts of a layer do not feed
    each other, so a run of expert stages (e0.gate_up, e0.down, e1.gate_up, ...) is reordered
    projection by projection, and all experts' stages of one projection form one step. A layer
    of 128 experts then costs two re-runs of its block instead of 256.
    """
    steps: list[list[list[str]]] = []
    run: list[list[str]] = []

    def flush() -> None:
        order = list(dict.fromkeys(projection[st[0]] for st in run))
        steps.extend([st for st in run if projection[st[0]] == p] for p in order)
        run.clear()

    for stage in stages:
        if stage[0] in projection:
            run.append(stage)
            continue
        flush()
        steps.append([stage])
    flush()
    return steps


StageQuantizer = Callable[[list[str], list[torch.Tensor], InputStats], list[GroupQuant]]
"""(names, weights, statistics of their shared input) -> one GroupQuant per name."""


@torch.no_grad()
def quantize_blocks(
    model: nn.Module,
    linears: list[LinearInfo],
    calib: torch.Tensor,
    quantize_stage: StageQuantizer,
    batch_size: int = 8,
    sequential: bool = True,
    label: str = "calibrated",
) -> dict[str, GroupQuant]:
    """Quantize `linears` block by block, one stage of linears sharing an input at a time.

    The model's weights are restored before returning (it comes back unchanged).
    """
    _, blocks = find_decoder_blocks(model)
    by_block: dict[int, list[str]] = {}
    for li in linears:
        by_block.setdefault(li.block, []).append(li.name)
    projection = {li.name: li.projection for li in linears if li.expert is not None}  # expert linears only
    uncalibrated: list[str] = []
    if not by_block:
        return {}
    last = max(by_block)
    t0, t_log = time.perf_counter(), time.perf_counter()
    hidden, calls = capture_block_calls(model, blocks, calib, batch_size, last)
    originals: dict[str, nn.Parameter] = {}
    results: dict[str, GroupQuant] = {}
    try:
        for b in range(last + 1):
            block = blocks[b]
            modules = {n: model.get_submodule(n) for n in by_block.get(b, [])}
            if modules:
                rec = _Recorder(modules, measure=1 if sequential else None).run(block, hidden, calls[b])
                not_called = rec.missing
                never_called = sorted(set(not_called) - projection.keys())
                if never_called:
                    raise RuntimeError(f"{never_called[0]} was never called by its block's forward; it cannot be calibrated")
                for j, step in enumerate(_steps([*rec.stages, *([n] for n in not_called)], projection)):
                    measured = rec
                    if sequential and (j > 0 or len(step) > 1):  # inputs changed by the stages quantized before (or not measured yet)
                        measured = _Recorder({n: modules[n] for st in step for n in st if n not in not_called}).run(block, hidden, calls[b])
                    for stage in step:
                        stats = measured.stats_of(stage[0])
                        if stats is None:  # an expert no calibration token was routed to
                            uncalibrated.extend(stage)
                            stats = InputStats.uncalibrated(modules[stage[0]].in_features, modules[stage[0]].weight.device)
                        quants = quantize_stage(stage, [modules[n].weight.detach() for n in stage], stats)
                        for n, q in zip(stage, quants):
                            m = modules[n]
                            results[n] = q
                            originals[n] = m.weight
                            m.weight = nn.Parameter(q.dequantize().to(m.weight.dtype), requires_grad=False)
            if b < last:
                hidden = [run_block(block, h, c) for h, c in zip(hidden, calls[b])]
            if time.perf_counter() - t_log > 10 or b == last:
                log.info("%s: %d/%d blocks, %d linears quantized (%.1fs)", label, b + 1, last + 1, len(results), time.perf_counter() - t0)
                t_log = time.perf_counter()
    finally:
        for n, w in originals.items():
            model.get_submodule(n).weight = w
    if uncalibrated:
        log.warning(
            "%s: %d expert linears got no calibration token (e.g. %s): quantized without calibration data; more calibration tokens reach more experts",
            label,
            len(uncalibrated),
            uncalibrated[0],
        )
    return {li.name: results[li.name] for li in linears}
