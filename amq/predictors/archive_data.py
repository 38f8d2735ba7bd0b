"""Predictor training data from a run's archive.jsonl, independent of how the run built its space.

Features are re-derived from each record's per-module `config.bits` (sorted module order, scaled
by the lowest and highest bit width seen), matching SearchSpace.features up to constant columns
for pinned linears, which no predictor is affected by. This lets benchmarks and tests use any
run's archive without rebuilding the model, its sensitivity table or its search space.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class ArchiveData:
    modules: list[str]
    bits: np.ndarray  # [n, modules], in archive order
    metric: np.ndarray  # [n]
    keys: list[str]  # one identity per configuration, for overlap checks
    iteration: np.ndarray  # [n]

    def features(self, lo: float | None = None, hi: float | None = None) -> np.ndarray:
        lo = float(self.bits.min()) if lo is None else lo
        hi = float(self.bits.max()) if hi is None else hi
        return (self.bits - lo) / (hi - lo)


def load_archive(path: str | Path, metric: str = "jsd") -> ArchiveData:
    """Read a run directory's (or a file's) archive; a configuration written twice counts once."""
    path = Path(path)
    path = path / "archive.jsonl" if path.is_dir() else path
    seen: set[str] = set()
    recs: list[tuple[str, dict]] = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a torn last line after a crash
            continue
        k = json.dumps(r["config"]["bits"], sort_keys=True)
        if k not in seen:
            seen.add(k)
            recs.append((k, r))
    if not recs:
        raise ValueError(f"{path} holds no archived configurations")
    modules = sorted(recs[0][1]["config"]["bits"])
    bits = np.array([[r["config"]["bits"][m] for m in modules] for _, r in recs], dtype=np.float64)
    y = np.array([r["metrics"][metric] for _, r in recs], dtype=np.float64)
    it = np.array([r.get("iteration", 0) for _, r in recs], dtype=int)
    return ArchiveData(modules, bits, y, [k for k, _ in recs], it)
