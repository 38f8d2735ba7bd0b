"""The confirmation pass: re-measure each target's near-tied candidates on other calibration windows.

A calibration gain of about 1% on a few thousand tokens is within the metric's noise: the search's
best configuration at a target can then lose on held-out text to one it beat by that margin
(docs/benchmarks.md, Gemma-3-270M). After the search, for every target, the best few archived
configurations at or under it whose metric is within `band` of the best's are measured again on
`samples` more calibration windows (drawn from the calibration split with their own seed, never
the held-out text), and the pick is the lowest metric over both sets of windows together (each
window counted once, as if one metric had run on all of them).

The measurements go to `confirm.jsonl` in the run directory, one flushed line per configuration,
so a resumed run measures only what is missing and finalize reads them beside the archive.
Candidates depend on the archive alone and the windows on `data_seed`: a run is deterministic.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Sequence

import numpy as np

from amq.errors import InvalidArgument
from amq.io import append_jsonl, read_jsonl, repair_jsonl
from amq.search.archive import Archive
from amq.search.evaluator import Evaluate
from amq.search.pareto import best_under_target

log = logging.getLogger(__name__)

CONFIRM_FILE = "confirm.jsonl"
WINDOW_STREAM = 0xC0F1  # mixed with data_seed: the confirmation windows' own random stream
BITS_TOLERANCE = 1e-9  # as best_under_target


@dataclass(frozen=True)
class ConfirmSettings:
    """How the confirmation pass works (`search.confirm`; samples 0: off)."""

    samples: int = 0  # more calibration windows (of the search's length) per candidate
    candidates: int = 3  # per target, at most this many of the best configurations...
    band: float = 0.02  # ...whose metric is within this fraction of the best's

    def __post_init__(self) -> None:
        for key, low in (("samples", 0), ("candidates", 2)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidArgument(key, f"{value!r}", f"an integer >= {low}" + (" (0: no confirmation pass)" if key == "samples" else ""))
        if isinstance(self.band, bool) or not isinstance(self.band, (int, float)) or not 0.0 < float(self.band) <= 1.0:
            raise InvalidArgument("band", f"{self.band!r}", "a fraction of the best metric, > 0 and <= 1 (e.g. 0.02)")

    @property
    def enabled(self) -> bool:
        return self.samples > 0


def window_seed(data_seed: int) -> int:
    """The seed of the confirmation windows: other windows than the search's, fixed by `data_seed`."""
    return int(np.random.SeedSequence([int(data_seed), WINDOW_STREAM]).generate_state(1)[0])


def combined(search_value: float, n_search: int, confirm_value: float, n_confirm: int) -> float:
    """The metric over both sets of windows (means weighted by their windows, all of one length)."""
    return (search_value * n_search + confirm_value * n_confirm) / (n_search + n_confirm)


def near_ties(metric: np.ndarray, bits: np.ndarray, target: float, candidates: int, band: float) -> list[int]:
    """Indices of the best `candidates` finite configurations at or under `target` whose metric is
    within `band` of the best's (ordered best first; at least the best itself)."""
    metric, bits = np.asarray(metric, dtype=float), np.asarray(bits, dtype=float)
    ok = np.flatnonzero((bits <= target + BITS_TOLERANCE) & np.isfinite(metric))
    if not len(ok):
        return []
    order = ok[np.lexsort((bits[ok], metric[ok]))]
    limit = metric[order[0]] * (1.0 + band)
    return [int(i) for i in order[:candidates] if metric[i] <= limit]


def confirmed_pick(metric: np.ndarray, bits: np.ndarray, confirmed: np.ndarray, target: float) -> int | None:
    """The pick at `target`: the lowest `metric` at or under it, unless that one was confirmed; then
    the lowest `confirmed` value among the confirmed ones at or under it (NaN: not confirmed)."""
    idx = best_under_target(metric, bits, target)
    confirmed = np.asarray(confirmed, dtype=float)
    if idx is None or not np.isfinite(confirmed[idx]):
        return idx
    ok = np.flatnonzero((np.asarray(bits) <= target + BITS_TOLERANCE) & np.isfinite(confirmed))
    return int(ok[np.lexsort((np.asarray(bits)[ok], confirmed[ok]))[0]])


class Confirmations:
    """The confirmation measurements of one run (confirm.jsonl), keyed by configuration."""

    def __init__(self, archive: Archive, path: str | Path | None, n_search: int, n_confirm: int, metric_name: str) -> None:
        self.archive, self.path = archive, Path(path) if path else None
        self.n_search, self.n_confirm, self.metric_name = n_search, n_confirm, metric_name
        self.values: dict[str, float] = {}  # gene key -> metric on the confirmation windows (inf: failed)
        if self.path is not None:
            for d in repair_jsonl(self.path):
                value = d["metrics"].get(metric_name)
                self.values[archive.space.key(np.asarray(d["genes"], dtype=int))] = math.inf if value is None else float(value)

    def __len__(self) -> int:
        return len(self.values)

    def combined_array(self) -> np.ndarray:
        """The metric over both sets of windows of every archive record, in archive order (NaN: not
        confirmed; inf: its confirmation failed)."""
        out = np.full(len(self.archive), math.nan)
        for i, r in enumerate(self.archive.records):
            value = self.values.get(self.archive.space.key(r.genes))
            if value is not None:
                out[i] = combined(r.metric, self.n_search, value, self.n_confirm)
        return out

    def add(self, genes: np.ndarray, value: float, seconds: float, targets: Sequence[float]) -> None:
        """Record (and append) one confirmation measurement of an archived configuration."""
        space = self.archive.space
        key = space.key(genes)
        search_value = next(r.metric for r in self.archive.records if space.key(r.genes) == key)
        finite = math.isfinite(value)
        line = {
            "genes": np.asarray(genes, dtype=int).tolist(),
            "config": space.to_config(genes).to_dict(),
            "targets": [float(t) for t in targets],
            "metrics": {self.metric_name: value if finite else None},
            "search_metric": search_value,
            "combined": combined(search_value, self.n_search, value, self.n_confirm) if finite else None,
            "windows": {"search": self.n_search, "confirm": self.n_confirm},
            "eval_seconds": round(seconds, 4),
        }
        if self.path is not None:
            append_jsonl(self.path, line)
        self.values[key] = value if finite else math.inf


def read_confirmed(path: Path, metric_name: str) -> dict[tuple, float]:
    """{sorted (linear, bits) items: combined metric} of a run's confirm.jsonl (empty without one);
    read only (a torn last line is skipped, not repaired: the run that resumes repairs it)."""
    out = {}
    for d in read_jsonl(path):
        if d.get("combined") is not None and d["metrics"].get(metric_name) is not None:
            out[tuple(sorted(d["config"]["bits"].items()))] = float(d["combined"])
    return out


def run_confirmation(
    archive: Archive,
    store: Confirmations,
    evaluate: Evaluate,
    targets: Sequence[float],
    settings: ConfirmSettings,
    guard: Callable[[], ContextManager],
) -> dict:
    """Measure every target's near-tied candidates not yet confirmed; returns what it found per
    target (the search's pick, the confirmed pick, their metrics) and the cost, for logs and summary."""
    _, y, bits = archive.arrays()
    y = np.where(np.isfinite(y), y, np.inf)
    wanted: dict[int, list[float]] = {}
    for t in targets:
        for i in near_ties(y, bits, t, settings.candidates, settings.band):
            wanted.setdefault(i, []).append(float(t))
    new, seconds = 0, 0.0
    for i, ts in wanted.items():
        genes = archive.records[i].genes
        if archive.space.key(genes) in store.values:
            continue
        with guard():
            result = evaluate(genes)
            store.add(genes, result.value if result.ok else math.inf, result.seconds, ts)
        if not result.ok:
            log.warning("confirmation: evaluation failed (%s); that candidate keeps its search metric only", result.failure)
        new, seconds = new + 1, seconds + result.seconds
    confirmed = store.combined_array()
    confirmed = np.where(np.isinf(confirmed), np.nan, confirmed)  # a failed confirmation: not confirmed
    per_target, parts = {}, []
    for t in targets:
        before, after = best_under_target(y, bits, t), confirmed_pick(y, bits, confirmed, t)
        if before is None:
            continue
        n = len(near_ties(y, bits, t, settings.candidates, settings.band))
        per_target[f"{t:g}"] = {
            "candidates": n,
            "search_pick_metric": float(y[before]),
            "confirmed_pick_metric": float(y[after]),
            "search_pick_combined": None if np.isnan(confirmed[before]) else float(confirmed[before]),
            "combined": None if np.isnan(confirmed[after]) else float(confirmed[after]),
            "changed": bool(after != before),
        }
        changed = "changed" if after != before else "kept"
        parts.append(f"{t:g}b: {n} candidates, {changed} ({y[before]:.4g} -> {y[after]:.4g} on the search's windows)")
    log.info(
        "confirmation: %d new measurements on %d more windows (%d in all) [%.1fs]; %s",
        new,
        store.n_confirm,
        len(store),
        seconds,
        "; ".join(parts) or "no target reachable",
    )
    return {"samples": store.n_confirm, "measured": len(store), "new": new, "seconds": seconds, "targets": per_target}
