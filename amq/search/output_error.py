"""Middle widths' damages without probing them (`search.sensitivity_widths=estimated`).

A sensitivity probe at a middle width (3 bits in {2, 3, 4}) does little damage, so on the one
window a cheap table affords it is about half noise (docs/benchmarks.md, "Shrinking the middle
widths' damage"). The lowest width's probes are precise (their ranking holds across windows), and
what a linear's quantization does to the model grows with what it does to the linear's output.
So each linear's damage at a middle width b is estimated as

    damage(b) = damage(lowest) x (e(b) - e(highest)) / (e(lowest) - e(highest)),
    e(w) = sum over calibration tokens x of ||(W_w - W) x||^2,

the probed end-to-end sensitivity of the linear, scaled by how much of the lowest width's output
error remains at width b (each damage is an increase over the all-highest configuration, hence
the differences). e(w) comes from one pass of the unquantized model over the calibration windows,
with the proxy's quantized weights: no probe at any middle width. The tokens the probes would
have cost can go to the lowest width's probes on more windows, which is where the ranking is
decided (docs/benchmarks.md, "Estimated middle widths").
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import numpy as np
import torch

from amq.proxy.bank import ProxyBank
from amq.search.sensitivity import SensitivityTable

log = logging.getLogger(__name__)


def output_errors(bank: ProxyBank, tokens: torch.Tensor, units: Sequence[Sequence[str]], widths: Sequence[int]) -> dict[int, dict[str, float]]:
    """e(w) of every unit (summed over its linears; keyed by its first name, as the sensitivity
    table keys it) at every width, over every row of `tokens` (one window per forward)."""
    owner = {n: unit[0] for unit in units for n in unit}
    errors = {w: dict.fromkeys(owner.values(), 0.0) for w in widths}

    def hook(name: str):
        def record(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            if x.shape[0] == 0:  # an expert no token was routed to
                return
            original = bank.weight(name, None).to(x.device, torch.float32)
            for w in widths:
                delta = bank.weight(name, w).to(x.device, torch.float32) - original
                errors[w][owner[name]] += float(torch.linalg.vector_norm(x @ delta.T) ** 2)

        return record

    bank.restore()
    device = next(bank.model.parameters()).device
    handles = [bank.modules[n].register_forward_hook(hook(n)) for n in owner]
    try:
        with torch.no_grad():
            for row in tokens:
                bank.model(input_ids=row[None].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return errors


def estimate_middle_widths(table: SensitivityTable, errors: dict[int, dict[str, float]], tokens: int) -> SensitivityTable:
    """`table` (lowest-width probes) with every width of `errors` strictly between its lowest and
    highest estimated from those output errors (`output_errors` over `tokens` tokens).

    The ratio is clipped to [0, 1]: a middle width never estimated to do more damage than the
    lowest or less than the highest. A unit whose lowest width leaves its output as it was (an
    expert no calibration token reached) takes the median ratio of the others."""
    low, high = table.low_bits, table.high_bits
    mids = sorted(w for w in errors if low < w < high)
    names = list(table.damage)
    mid: dict[int, dict[str, float]] = {}
    for w in mids:
        ratios = {}
        for n in names:
            span = errors[low][n] - errors[high][n]
            if span > 0:
                ratios[n] = min(max((errors[w][n] - errors[high][n]) / span, 0.0), 1.0)
        if not ratios:
            raise ValueError(f"no linear's output changed at {low} bits on the calibration windows: nothing to estimate the {w}-bit damages from")
        fallback = float(np.median(list(ratios.values())))
        mid[w] = {n: table.damage[n] * ratios.get(n, fallback) for n in names}
        log.info(
            "sensitivity: %d-bit damages estimated as %d-bit damage x output-error ratio (median %.3f, %d of %d units from the median)",
            w,
            low,
            fallback,
            len(names) - len(ratios),
            len(names),
        )
    return dataclasses.replace(table, mid=mid, estimate_tokens=tokens)
