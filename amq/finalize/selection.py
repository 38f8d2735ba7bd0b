"""Pick, for each bits budget, the archived configuration with the best measured metric.

Works on the archive file (`archive.jsonl`, and `confirm.jsonl` beside it where the search ran its
confirmation pass) alone, so a finished run can be finalized again later with other budgets or
another final quantizer, without rebuilding the search space. Where the best configuration at a
budget was confirmed, the pick is the best confirmed one there on the metric over all windows
(`amq.search.confirmation.confirmed_pick`), as the search's summary reports it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from amq.bits import BitConfig
from amq.errors import ConfigError
from amq.io import read_jsonl
from amq.search.confirmation import CONFIRM_FILE, confirmed_pick, read_confirmed

log = logging.getLogger(__name__)

CONVENTIONS = {"with_meta": "avg_bits", "weights_only": "avg_bits_weights_only"}


@dataclass(frozen=True)
class Candidate:
    """One archived configuration: its bit config, both bit figures and its proxy metric."""

    config: BitConfig
    avg_bits: float
    avg_bits_weights_only: float
    metric: float
    iteration: int
    confirmed: float | None = None  # the metric over the search's and the confirmation's windows (None: not confirmed)

    def bits_in(self, convention: str) -> float:
        return self.avg_bits if convention == "with_meta" else self.avg_bits_weights_only


@dataclass(frozen=True)
class Selection:
    target: float
    candidate: Candidate


def archive_metric(archive_path: Path) -> str:
    """The name of the true metric a run's archive holds (the first record's, e.g. `jsd`)."""
    for d in read_jsonl(archive_path):
        names = sorted(d.get("metrics") or {})
        if names:
            return names[0]
    raise ConfigError("finalize", f"{archive_path} holds no measured configuration", "the directory of a finished amq-search run")


def read_candidates(archive_path: Path, metric_name: str) -> list[Candidate]:
    """Finite-metric configurations of an archive, de-duplicated by configuration."""
    if not archive_path.is_file():
        raise ConfigError("finalize", f"{archive_path} does not exist", "the directory of a finished amq-search run")
    seen: set[tuple] = set()
    confirmed = read_confirmed(archive_path.parent / CONFIRM_FILE, metric_name)
    out = []
    for d in read_jsonl(archive_path):
        value = float(d["metrics"].get(metric_name, math.inf))
        cfg = BitConfig.from_dict(d["config"])
        key = cfg.key()
        if not math.isfinite(value) or key in seen:
            continue
        seen.add(key)
        out.append(Candidate(cfg, float(d["avg_bits"]), float(d["avg_bits_weights_only"]), value, int(d["iteration"]), confirmed.get(key)))
    return out


def select_for_targets(candidates: Sequence[Candidate], targets: Sequence[float], convention: str) -> list[Selection]:
    """Best metric at or under each target; a target nothing meets is an error naming what is reachable."""
    if convention not in CONVENTIONS:
        raise ConfigError("finalize.bits_convention", f"{convention!r}", ", ".join(CONVENTIONS))
    if not targets:
        raise ConfigError("finalize.targets", "no targets given", "a list of average-bits budgets, e.g. [4.0, 4.5]")
    if not candidates:
        raise ConfigError("finalize", "the archive holds no configuration with a finite metric", "a run that evaluated at least one configuration")
    lowest = min(c.bits_in(convention) for c in candidates)
    metric = np.array([c.metric for c in candidates])
    bits = np.array([c.bits_in(convention) for c in candidates])
    confirmed = np.array([math.nan if c.confirmed is None else c.confirmed for c in candidates])
    out = []
    for t in targets:
        idx = confirmed_pick(metric, bits, confirmed, float(t))
        if idx is None:
            raise ConfigError(
                "finalize.targets",
                f"no archived configuration fits {float(t):g} average bits ({convention}); the smallest has {lowest:.3f}",
                f"targets >= {lowest:.3f}",
            )
        best = candidates[idx]
        note = "" if best.confirmed is None else f" ({best.confirmed:.4g} over the confirmation's windows too)"
        log.info("target %g bits: %.4f bits (%s), metric %.4g%s, from iteration %d", t, best.bits_in(convention), convention, best.metric, note, best.iteration)
        out.append(Selection(float(t), best))
    return out


def front_extras(candidates: Sequence[Candidate], chosen: Sequence[Candidate], n: int, convention: str) -> list[Candidate]:
    """`n` more non-dominated configurations, spread along bits, for the proxy-fidelity check."""
    if n <= 0:
        return []
    ordered = sorted(candidates, key=lambda c: (c.bits_in(convention), c.metric))
    front, best = [], math.inf
    for c in ordered:
        if c.metric < best:
            front.append(c)
            best = c.metric
    rest = [c for c in front if c not in chosen]
    if len(rest) <= n:
        return rest
    step = (len(rest) - 1) / max(n - 1, 1)
    return [rest[round(i * step)] for i in range(n)]
