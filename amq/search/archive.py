"""The archive of truly evaluated configurations, persisted one JSON line per evaluation.

Appends are flushed per evaluation, so a crash loses at most the evaluation in flight. Loading
drops a torn last line (a crash mid-append), refuses a damaged line anywhere else (it can't be
trusted, and dropping it would lose a result silently), and de-duplicates by gene key, so a line
written twice never counts twice. A failed evaluation (non-finite metric) is kept with its reason
and a null metric, so it is never proposed again.

Each record proposed by a predictor keeps that prediction (`predicted`, made before the evaluation),
so the predictor's held-out accuracy can be pooled over the whole search, a resumed one included;
records of the initial design, lines written before this field existed and non-finite predictions
have none.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from amq.errors import InvalidArgument
from amq.io import append_jsonl, write_jsonl
from amq.search.evaluator import Evaluation
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
    failure: str | None = None  # why the evaluation failed (metric is then inf)
    reused: bool = False  # taken from the evaluation cache
    predicted: float | None = None  # the predictor's value when it proposed the configuration (None: not proposed by one)


class Archive:
    def __init__(self, space: SearchSpace, path: str | Path | None = None) -> None:
        self.space, self.path = space, Path(path) if path else None
        self.records: list[Record] = []
        self._keys: set[str] = set()

    def __len__(self) -> int:
        return len(self.records)

    def __contains__(self, genes: np.ndarray) -> bool:
        return self.space.key(genes) in self._keys

    def add(self, genes: np.ndarray, result: Evaluation, iteration: int, metric_name: str, predicted: float | None = None) -> Record:
        """Record (and append to the file) one true evaluation; `predicted`: the proposing predictor's value."""
        genes = np.asarray(genes, dtype=int)
        rec = Record(
            genes=genes,
            metric=float(result.value) if result.ok else math.inf,
            avg_bits=float(self.space.avg_bits(genes)),
            avg_bits_weights_only=float(self.space.avg_bits(genes, with_meta=False)),
            iteration=iteration,
            seconds=result.seconds,
            failure=result.failure,
            reused=result.reused,
            predicted=float(predicted) if predicted is not None and math.isfinite(predicted) else None,
        )
        if self.path is not None:
            append_jsonl(self.path, self._to_json(rec, metric_name))
        self._insert(rec)
        return rec

    def _insert(self, rec: Record) -> None:
        self.records.append(rec)
        self._keys.add(self.space.key(rec.genes))

    def _to_json(self, rec: Record, metric_name: str) -> dict:
        out = {
            "iteration": rec.iteration,
            "genes": rec.genes.tolist(),
            "avg_bits": rec.avg_bits,
            "avg_bits_weights_only": rec.avg_bits_weights_only,
            "metrics": {metric_name: rec.metric if rec.failure is None else None},
            "eval_seconds": round(rec.seconds, 4),
            "config": self.space.to_config(rec.genes).to_dict(),
        }
        if rec.failure is not None:
            out["failed"] = rec.failure
        if rec.reused:
            out["reused"] = True
        if rec.predicted is not None:
            out["predicted"] = rec.predicted
        return out

    def _from_json(self, d: dict, metric_name: str) -> Record:
        value = d["metrics"][metric_name]
        return Record(
            genes=np.asarray(d["genes"], dtype=int),
            metric=math.inf if value is None else float(value),
            avg_bits=float(d["avg_bits"]),
            avg_bits_weights_only=float(d["avg_bits_weights_only"]),
            iteration=int(d["iteration"]),
            seconds=float(d.get("eval_seconds", 0.0)),
            failure=d.get("failed"),
            reused=bool(d.get("reused", False)),
            predicted=None if d.get("predicted") is None else float(d["predicted"]),
        )

    def load(self, metric_name: str) -> int:
        """Read the archive file (if any); returns how many records were loaded."""
        if self.path is None or not self.path.exists():
            return 0
        lines = self.path.read_text(encoding="utf-8").split("\n")
        complete, tail = lines[:-1], lines[-1]  # text after the last newline: a torn append
        records: list[dict] = []
        for i, line in enumerate(complete, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                rec = self._from_json(d, metric_name)
            except (ValueError, KeyError, TypeError) as exc:
                if i == len(complete) and not tail:  # a crash can also leave the last line complete but cut
                    tail = line
                    break
                raise InvalidArgument("archive", f"{self.path} line {i} is damaged ({type(exc).__name__})", "restore the file, or start a new run") from None
            if len(rec.genes) != self.space.n_genes:
                raise InvalidArgument(
                    "archive", f"{self.path} line {i} has {len(rec.genes)} genes, this search space {self.space.n_genes}", "the run's own archive"
                )
            records.append(d)
            self._add_loaded(rec)
        if tail.strip():
            # A crash tore the last line: keep the intact records so new appends start on a clean line.
            log.warning("archive: dropping a torn line at the end of %s", self.path.name)
            write_jsonl(self.path, records)
        return len(self.records)

    def _add_loaded(self, rec: Record) -> None:
        if self.space.key(rec.genes) in self._keys:
            log.warning("archive: ignored a duplicate line (iteration %d)", rec.iteration)
            return
        self._insert(rec)

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
