"""Shrink the sensitivity table's middle-width damages toward what the lowest width predicts.

With `search.sensitivity_widths=all` each linear is probed at the middle widths too (3 bits in
{2, 3, 4}). A middle width does little damage, so on one calibration window its probe is mostly
noise: on SmolLM2 the 3-bit damages measured on one 512-token window differ from those on three
other windows by as much as their median value, and 27 of 210 are negative. The knapsack seeds
and the predictor's prior then put linears that were cheap by chance at 3 bits
(docs/benchmarks.md, "Shrinking the middle widths' damage").

The lowest width's probe is far more precise (its damage is about six times larger, its standard
error about twice), and within one role (q_proj, gate_proj, ...) a linear's damage at a middle
width is roughly a fixed fraction of its lowest-width damage. So each middle-width damage m (standard error s, from the
probe's per-token values) is combined with the prior r x l (l: the linear's lowest-width damage,
r: the role's least-squares ratio of m to l) by empirical Bayes:

    shrunk = (tau^2 m + s^2 r l) / (tau^2 + s^2)

where tau^2, the spread of the role's true damages around r x l, and r are estimated from the role's
probes and their standard errors together (`shrink_role`).

A precise probe keeps its value; a noisy one moves toward what its role and lowest width predict.
Roles with fewer than `MIN_ROLE` linears keep their measured values.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from typing import Callable

import numpy as np

from amq.errors import InvalidArgument
from amq.search.sensitivity import SensitivityTable

log = logging.getLogger(__name__)

MIN_ROLE = 4  # linears a role needs for its ratio and spread to be estimated


def role_of(name: str) -> str:
    """A linear's role: the last part of its module name (`model.layers.3.mlp.up_proj`: `up_proj`)."""
    return name.rsplit(".", 1)[-1]


def _fit(measured: np.ndarray, lowest: np.ndarray, noise: np.ndarray, tau2: float) -> tuple[float, float]:
    """The ratio weighted by 1 / (tau^2 + s^2), and the weighted residual sum of squares at it."""
    w = 1.0 / (tau2 + noise)
    ratio = float(np.sum(w * measured * lowest) / np.sum(w * lowest**2))
    return ratio, float(np.sum(w * (measured - ratio * lowest) ** 2))


def shrink_role(measured: np.ndarray, lowest: np.ndarray, stderr: np.ndarray) -> tuple[np.ndarray, float, float]:
    """One role's shrunk damages, its ratio r and its spread tau (see the module docstring).

    tau^2 is the Paule-Mandel estimate: the spread at which the weighted residuals are as large as
    their degrees of freedom. Unlike the plain moment estimate it is not swamped by one very noisy
    probe, whose weight is small."""
    noise = np.maximum(stderr, 0.0) ** 2 + 1e-30
    if float(np.sum(lowest**2)) <= 0 or not np.all(np.isfinite(noise)) or len(measured) < 2:
        return measured.copy(), float("nan"), float("nan")
    dof = len(measured) - 1
    lo, hi = 0.0, float(np.sum(measured**2)) / dof  # at hi the weighted residuals are at most dof (r = 0 bounds them)
    if _fit(measured, lowest, noise, lo)[1] <= dof:
        hi = lo  # the probes' own noise explains all of the spread around the prior
    for _ in range(100):  # the weighted residuals fall as tau^2 grows: bisect for the root
        if hi - lo <= 1e-12 * max(hi, 1e-30):
            break
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _fit(measured, lowest, noise, mid)[1] > dof else (lo, mid)
    tau2 = max(0.5 * (lo + hi), 1e-30)
    ratio, _ = _fit(measured, lowest, noise, tau2)
    prior = ratio * lowest
    return (tau2 * measured + noise * prior) / (tau2 + noise), ratio, tau2**0.5


def shrink_middle_widths(table: SensitivityTable, role: Callable[[str], str] = role_of) -> SensitivityTable:
    """`table` with every middle width's damages shrunk by role; the probed values stay in `mid_measured`."""
    if not table.mid:
        raise InvalidArgument("table", "has no middle widths to shrink", "a table probed at every width (search.sensitivity_widths=all)")
    if missing := [b for b in table.mid if b not in table.stderr]:
        raise InvalidArgument(
            "table", f"its {missing[0]}-bit probes carry no standard errors", "a metric that reports per-token values (metric=kl or metric=jsd)"
        )
    groups: dict[str, list[str]] = defaultdict(list)
    for name in table.damage:
        groups[role(name)].append(name)
    shrunk: dict[int, dict[str, float]] = {}
    for bits, values in table.mid.items():
        out = dict(values)
        for r, names in sorted(groups.items()):
            if len(names) < MIN_ROLE:
                continue
            m, low, s = (np.array([src[n] for n in names], dtype=float) for src in (values, table.damage, table.stderr[bits]))
            post, ratio, tau = shrink_role(m, low, s)
            out.update(zip(names, map(float, post)))
            log.info(
                "sensitivity: %d-bit %s damages shrunk toward %.3f x their %d-bit damage (spread %.2e, median standard error %.2e)",
                bits,
                r,
                ratio,
                table.low_bits,
                tau,
                float(np.median(s)),
            )
        shrunk[bits] = out
    return dataclasses.replace(table, mid=shrunk, mid_measured={b: dict(v) for b, v in table.mid.items()})
