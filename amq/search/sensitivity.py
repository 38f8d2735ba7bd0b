"""Stage: per-linear sensitivity and search-space pruning.

With every linear at the highest bit width, drop one linear at a time to the lowest width and
measure the search metric. Linears whose score exceeds `threshold x median` are pinned to the
highest width and leave the search (AMQ's pruning; threshold 2.0 in the reference), or, with
`keep_top` > 1, keep only the highest few widths.

With `search.sensitivity_widths=all` each linear is also probed at every width between the lowest
and the highest (`SensitivityTable.mid`; pruning still reads the lowest width): the allocations
built from the table then use each width's measured damage instead of scaling the lowest width's
by one factor per width (docs/benchmarks.md, "Probing every width"). With `estimated` those
widths are not probed: their damages are estimated from the lowest width's and one pass's output
errors (amq.search.output_error; docs/benchmarks.md, "Estimated middle widths").

The score is, as in the AMQ reference, the probe's own metric against the unquantized model
(`score=total`), which includes the error of the all-highest configuration; or, with
`score=damage`, only the increase over it. The total rule pins a linear when
`damage > 2 x median damage + baseline` (threshold 2), so when the highest width is itself lossy
it pins only outliers (docs/benchmarks.md, "Search-space pruning against the reference").
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from amq.errors import InvalidArgument
from amq.io import append_jsonl, atomic_write_json, file_lock, repair_jsonl
from amq.metrics.base import QualityMetric
from amq.proxy.bank import ProxyBank

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SensitivityTable:
    damage: dict[str, float]
    baseline: float
    low_bits: int
    high_bits: int
    metric: str
    seconds: float
    mid: dict[int, dict[str, float]] = field(default_factory=dict)  # width -> damage at that width (sensitivity_widths=all)
    stderr: dict[int, dict[str, float]] = field(default_factory=dict)  # width -> each probe's standard error (metrics with per-token values)
    mid_measured: dict[int, dict[str, float]] = field(default_factory=dict)  # width -> `mid` as probed, where `mid` holds shrunk values
    estimate_tokens: int = 0  # > 0: `mid` was estimated, not probed, from one pass over this many tokens (amq.search.output_error)

    def to_dict(self) -> dict:
        out = {
            "low_bits": self.low_bits,
            "high_bits": self.high_bits,
            "metric": self.metric,
            "baseline_all_high": self.baseline,
            "seconds": round(self.seconds, 3),
            "damage": self.damage,
        }
        for key, values in (("mid", self.mid), ("stderr", self.stderr), ("mid_measured", self.mid_measured)):
            if values:
                out[key] = {str(b): d for b, d in values.items()}
        if self.estimate_tokens:
            out["estimate_tokens"] = self.estimate_tokens
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "SensitivityTable":
        mid, stderr, measured = ({int(b): dict(v) for b, v in d.get(key, {}).items()} for key in ("mid", "stderr", "mid_measured"))
        return cls(
            d["damage"], d["baseline_all_high"], d["low_bits"], d["high_bits"], d["metric"], d["seconds"], mid, stderr, measured, d.get("estimate_tokens", 0)
        )

    @property
    def probes(self) -> int:
        """Forwards that made the table: one per probed unit and width, plus each width's all-highest
        baseline (estimated middle widths add none: their one pass is `estimate_tokens`)."""
        return (len(self.damage) + 1) * (1 + (0 if self.estimate_tokens else len(self.mid)))

    def with_mid(self, tables: list["SensitivityTable"]) -> "SensitivityTable":
        """This (lowest-width) table with the damage of `tables` (one per middle width) attached."""
        mid = {t.low_bits: dict(t.damage) for t in tables}
        stderr = {**self.stderr, **{b: v for t in tables for b, v in t.stderr.items()}}
        return SensitivityTable(
            self.damage, self.baseline, self.low_bits, self.high_bits, self.metric, self.seconds + sum(t.seconds for t in tables), mid, stderr
        )


# search.sensitivity_widths: probe the lowest width only (AMQ), every width below the highest, or the
# lowest and estimate the widths between it and the highest from output errors (amq.search.output_error)
SENSITIVITY_WIDTHS = ("lowest", "all", "estimated")


PRUNING_SCORES = ("total", "damage")


@dataclass(frozen=True)
class Pruning:
    """Prune linears whose score exceeds threshold x the median score (threshold <= 0 disables pruning).

    `score`: `total`, the probe's metric against the unquantized model (the AMQ reference's
    sensitivity), or `damage`, that minus the all-highest baseline. Pruned linears keep only the
    `keep_top` highest bit widths (1: pinned at the highest, as in AMQ).
    """

    threshold: float = 2.0
    keep_top: int = 1
    score: str = "total"

    def __post_init__(self) -> None:
        if self.score not in PRUNING_SCORES:
            raise InvalidArgument("score", f"{self.score!r}", " or ".join(PRUNING_SCORES))

    def scores(self, table: SensitivityTable) -> dict[str, float]:
        """Each linear's score under this rule."""
        if self.score == "damage":
            return dict(table.damage)
        return {n: d + table.baseline for n, d in table.damage.items()}

    def pruned(self, table: SensitivityTable) -> list[str]:
        if self.threshold <= 0:
            return []
        scores = self.scores(table)
        bar = self.threshold * float(np.median(list(scores.values())))
        return sorted(n for n, v in scores.items() if v > bar)


BASELINE = ""  # the progress file's name for the all-high measurement


def paired_stderr(values: torch.Tensor, baseline: torch.Tensor) -> float:
    """Standard error of the mean per-token change from `baseline` to `values` (the same tokens).

    Treats tokens as independent, so it understates how much the damage moves between windows of
    the same text (1.3-1.5x at 3 bits, 1.7-2.0x at 2 bits on SmolLM2's 512-token windows: docs/benchmarks.md,
    "Shrinking the middle widths' damage"); it weighs probes against each other, which is what
    `search.shrink_table` needs."""
    diff = values.double() - baseline.double()
    if diff.numel() < 2:
        return float("nan")
    return float(diff.std() / diff.numel() ** 0.5)


def measure(
    bank: ProxyBank,
    metric: QualityMetric,
    low_bits: int,
    high_bits: int,
    progress: Path | None = None,
    names: list[str] | None = None,
    units: list[list[str]] | None = None,
) -> SensitivityTable:
    """Damage of each linear at `low_bits` with all others at `high_bits` (`names`: only these linears).

    `units` probes linears together (the experts of one projection in a layer, which share a
    gene): each unit's damage is recorded under its first linear's name.

    Each probe tells the metric which blocks changed, so its pass starts at the probed block.
    A metric with per-token values (`evaluate_tokens`) also gives each probe's standard error
    (`paired_stderr` against the all-highest pass), which `search.shrink_table` weighs.

    With `progress`, every measurement is appended to that file as it is made and read back on
    the next call, so a stage stopped half-way continues where it stopped instead of starting over.
    """
    if units is None:
        units = [[n] for n in (bank.layout.names if names is None else names)]
    t0 = last = time.perf_counter()
    records = repair_jsonl(progress) if progress else []
    done = {d["name"]: float(d["value"]) for d in records}
    stderr = {d["name"]: float(d["stderr"]) for d in records if d.get("stderr") is not None}
    if done:
        log.info("sensitivity: continuing after %d of %d probes measured earlier", max(len(done) - 1, 0), len(units))
    by_token = getattr(metric, "evaluate_tokens", None)
    base_tokens: list[torch.Tensor] = []  # the all-highest pass's per-token values, once known

    def probe() -> tuple[float, torch.Tensor | None]:
        if by_token is None:
            return metric.evaluate(bank.model, bank.block_states()), None
        return by_token(bank.model, bank.block_states())

    def measured(name: str) -> float:
        if name not in done:
            done[name], tokens = probe()
            record = {"name": name, "value": done[name]}
            if tokens is not None and name == BASELINE:
                base_tokens.append(tokens)
            elif tokens is not None:
                stderr[name] = record["stderr"] = paired_stderr(tokens, base_tokens[0])
            if progress:
                append_jsonl(progress, record)
        return done[name]

    bank.apply({n: high_bits for n in bank.layout.names})
    baseline = measured(BASELINE)
    if by_token is not None and not base_tokens and any(u[0] not in done for u in units):
        base_tokens.append(probe()[1])  # measured by a stopped run: its per-token values again (one pass)
    damage: dict[str, float] = {}
    for i, unit in enumerate(units):
        name = unit[0]
        if name not in done:
            bank.apply(dict.fromkeys(unit, low_bits))
        damage[name] = measured(name) - baseline
        bank.apply(dict.fromkeys(unit, high_bits))
        if time.perf_counter() - last > 10 or i + 1 == len(units):
            el = time.perf_counter() - t0
            log.info("sensitivity: %d/%d probes (%.0fs, ~%.0fs left)", i + 1, len(units), el, el / (i + 1) * (len(units) - i - 1))
            last = time.perf_counter()
    errors = {low_bits: {n: stderr[n] for n in damage}} if all(n in stderr for n in damage) else {}
    return SensitivityTable(damage, baseline, low_bits, high_bits, getattr(metric, "description", metric.name), time.perf_counter() - t0, stderr=errors)


def cached_measure(
    bank: ProxyBank, metric: QualityMetric, cache_dir: str | Path, context: dict, units: list[list[str]] | None = None, low: int | None = None
) -> SensitivityTable:
    """`measure` (of each of `units`, default: each linear) at width `low` (default: the lowest),
    reusing a table computed earlier under identical settings.

    `context` is everything the values depend on besides the widths (model, dtype, device,
    quantizer, metric, tokens, code: pipeline.evaluation_context), so a float32 and a bf16 run
    never share a table."""
    low, high = bank.bits[0] if low is None else int(low), bank.bits[-1]
    units = [[n] for n in bank.layout.names] if units is None else units
    payload = {**context, "low": low, "high": high}
    if any(len(u) > 1 for u in units):
        payload["units"] = units
    key = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"{key}.json"
    names = [u[0] for u in units]
    with_errors = hasattr(metric, "evaluate_tokens")  # a table cached without standard errors is measured again
    table = _load_cached_table(path, names, with_errors)
    if table is not None:
        return table
    with file_lock(path):  # parallel jobs of a sweep: one measures, the others wait and reuse it
        table = _load_cached_table(path, names, with_errors)
        if table is None:
            progress = path.with_suffix(".progress.jsonl")  # what a stopped measurement got done
            table = measure(bank, metric, low, high, progress, units=units)
            atomic_write_json(path, {**table.to_dict(), "key": payload})
            progress.unlink(missing_ok=True)
    return table


def _load_cached_table(path: Path, names: list[str], with_errors: bool) -> SensitivityTable | None:
    if not path.exists():
        return None
    try:
        table = SensitivityTable.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError):
        log.warning("sensitivity cache %s is unreadable; measuring again", path.name)
        return None
    if set(table.damage) != set(names) or (with_errors and not table.stderr):
        return None
    log.info("sensitivity: reused cached table %s", path.name)
    return table
