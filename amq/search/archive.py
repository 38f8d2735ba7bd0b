"""The archive of truly evaluated configurations, persisted one JSON line per evaluation.

Appends are flushed per evaluation, so a crash loses at most the evaluation in flight; loading
de-duplicates by gene key, so a line written twice never counts twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from amq.io import append_jsonl, read_jsonl, write_jsonl
from amq.search.space import SearchSpace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Record:
    genes: np.ndarray
    metric: float
    avg_bits: float
    avg_bits_weights_only: float
    iteration: int
    seconds: float


class Archive:
    def __init__(self, space: SearchSpace, path: str | Path | None = None) -> None:
        self.space, self.path = space, Path(path) if path else None
        self.records: list[Record] = []
        self._keys: set[str] = set()

    def __len__(self) -> int:
        return len(self.records)

    def __contains__(self, genes: np.ndarray) -> bool:
        return self.space.key(genes) in self._keys

    def add(self, genes: np.ndarray, metric: float, iteration: int, seconds: float, metric_name: str) -> Record:
        genes = np.asarray(genes, dtype=int)
        rec = Record(
            genes=genes,
            metric=float(metric),
            avg_bits=float(self.space.avg_bits(genes)),
            avg_bits_weights_only=float(self.space.avg_bits(genes, with_meta=False)),
            iteration=iteration,
            seconds=seconds,
        )
        if self.path is not None:
            append_jsonl(self.path, self._to_json(rec, metric_name))
        self._insert(rec)
        return rec

    def _insert(self, rec: Record) -> None:
        self.records.append(rec)
        self._keys.add(self.space.key(rec.genes))

    def _to_json(self, rec: Record, metric_name: str) -> dict:
        return {
            "iteration": rec.iteration,
            "genes": rec.genes.tolist(),
            "avg_bits": rec.avg_bits,
            "avg_bits_weights_only": rec.avg_bits_weights_only,
            "metrics": {metric_name: rec.metric},
            "eval_seconds": round(rec.seconds, 4),
            "config": self.space.to_config(rec.genes).to_dict(),
        }

    def load(self, metric_name: str) -> int:
        """Read the archive file (if any); returns how many records were loaded."""
        if self.path is None or not self.path.exists():
            return 0
        raw = self.path.read_text(encoding="utf-8")
        valid = list(read_jsonl(self.path))
        if raw and (not raw.endswith("\n") or len(valid) != raw.count("\n")):
            # A crash tore the last line: keep the intact records so new appends start on a clean line.
            log.warning("archive: dropping a torn line at the end of %s", self.path.name)
            write_jsonl(self.path, valid)
        dupes = 0
        for d in valid:
            genes = np.asarray(d["genes"], dtype=int)
            if self.space.key(genes) in self._keys:
                dupes += 1
                continue
            self._insert(
                Record(genes, float(d["metrics"][metric_name]), d["avg_bits"], d["avg_bits_weights_only"], int(d["iteration"]), float(d.get("eval_seconds", 0.0)))
            )
        if dupes:
            log.warning("archive: ignored %d duplicate lines", dupes)
        return len(self.records)

    # -------------------------------------------------------------- views
    def arrays(self, before_iteration: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(genes, metric, avg_bits) of all records, or of those from iterations < `before_iteration`."""
        recs = [r for r in self.records if before_iteration is None or r.iteration < before_iteration]
        if not recs:
            return np.zeros((0, self.space.n_genes), dtype=int), np.zeros(0), np.zeros(0)
        return (
            np.stack([r.genes for r in recs]),
            np.array([r.metric for r in recs]),
            np.array([r.avg_bits for r in recs]),
        )
