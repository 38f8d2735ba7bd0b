"""How far a cheaper sensitivity table agrees with an expensive one (scripts/bench_sensitivity.py).

The metric is a mean per token, so the table of k equally long windows is the mean of their
one-window tables (to float rounding): measuring one window at a time yields every cheaper table,
and several disjoint replicates of each, for the cost of the most expensive table alone.
"""

from __future__ import annotations

import statistics
from typing import Collection, Mapping, Sequence

from scipy import stats

from amq.errors import InvalidArgument
from amq.search.sensitivity import SensitivityTable


def mean_table(tables: Sequence[SensitivityTable]) -> SensitivityTable:
    """The table of the union of equally long windows, from one table per window; its seconds are their sum."""
    if not tables:
        raise InvalidArgument("tables", "no tables", "one table per window, at least one")
    first = tables[0]
    for t in tables[1:]:
        if set(t.damage) != set(first.damage) or (t.low_bits, t.high_bits) != (first.low_bits, first.high_bits):
            raise InvalidArgument("tables", "tables of different linears or widths", "tables of one model and space")
    damage = {n: statistics.fmean(t.damage[n] for t in tables) for n in first.damage}
    baseline = statistics.fmean(t.baseline for t in tables)
    metric = first.metric if len(tables) == 1 else f"mean of {len(tables)} one-window tables: {first.metric}"
    return SensitivityTable(damage, baseline, first.low_bits, first.high_bits, metric, sum(t.seconds for t in tables))


def replicate_windows(n_windows: int, per_table: int) -> list[list[int]]:
    """Disjoint consecutive groups of `per_table` window indices (the first is what the search measures)."""
    if not 1 <= per_table <= n_windows:
        raise InvalidArgument("per_table", f"{per_table}", f"an integer from 1 to {n_windows} (the calibration windows)")
    return [list(range(s, s + per_table)) for s in range(0, n_windows - per_table + 1, per_table)]


def rank_agreement(damage: Mapping[str, float], reference: Mapping[str, float]) -> dict[str, float]:
    """Kendall tau-b and Spearman rho of two per-linear damages over the reference's linears."""
    if set(damage) != set(reference):
        raise InvalidArgument("damage", "the tables hold different linears", "tables of one model")
    names = sorted(reference)
    a, b = [damage[n] for n in names], [reference[n] for n in names]
    return {"kendall_tau": float(stats.kendalltau(a, b).statistic), "spearman": float(stats.spearmanr(a, b).statistic)}


def jaccard(a: Collection[str], b: Collection[str]) -> float:
    """|a & b| / |a | b| of two pinned sets (1 when both are empty)."""
    union = set(a) | set(b)
    return len(set(a) & set(b)) / len(union) if union else 1.0


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, standard deviation (0 for one value), min and max over replicates."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }
