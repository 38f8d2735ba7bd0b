"""The run directory contract: what every run writes, where, and how (atomically).

config.yaml, sensitivity.json, archive.jsonl, front.json, front.csv, front.png, predictor.png, metrics.jsonl,
summary.json, and state.json (what resume needs). See outputs/README.md.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from amq.bits import CONVENTION_WEIGHTS_ONLY, CONVENTION_WITH_META
from amq.io import atomic_write_json, atomic_write_text, read_jsonl
from amq.run.plotting import UniformPoint, plot_front, plot_predictions
from amq.run.state import RunState, read_state, write_state
from amq.search.archive import Archive
from amq.search.pareto import nondominated

CONFIG_FILE = "config.yaml"
ARCHIVE_FILE = "archive.jsonl"
SUMMARY_FILE = "summary.json"
PREDICTOR_PLOT = "predictor.png"


class RunOutputs:
    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.dir / name

    @property
    def archive_path(self) -> Path:
        return self.path(ARCHIVE_FILE)

    def remove_stale_temps(self) -> None:
        """Temporary files of atomic writes a killed process left behind (the run is their only writer),
        and the model directories its finalize stage had not finished (`models/.<target>.*.tmp`, or
        the `.old` one a replacement was moving aside): the continued run writes them again."""
        for p in list(self.dir.iterdir()):
            if p.name.startswith(".") and p.name.endswith(".tmp") and not p.is_dir():
                p.unlink(missing_ok=True)
        models = self.dir / "models"
        for p in list(models.iterdir()) if models.is_dir() else []:
            if p.name.startswith(".") and p.name.endswith((".tmp", ".old")):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    # -------------------------------------------------------------- state for resume
    def read_state(self) -> RunState | None:
        return read_state(self.dir)

    def write_state(self, state: RunState) -> None:
        write_state(self.dir, state)

    def read_metrics(self, up_to_iteration: int) -> list[dict]:
        return [r for r in read_jsonl(self.path("metrics.jsonl")) if r.get("iteration", 1 << 30) <= up_to_iteration]

    def write_metrics(self, rows: list[dict]) -> None:
        atomic_write_text(self.path("metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))

    # -------------------------------------------------------------- front
    def write_front(self, archive: Archive, metric_name: str, title: str, targets: Sequence[float] = (), plot: bool = True) -> list[dict]:
        """front.json, front.csv and, with `plot`, front.png (with `targets` marked); returns the front's rows."""
        X, y, bits = archive.arrays()
        finite = np.isfinite(y)
        idx = np.flatnonzero(finite)[nondominated(np.column_stack([y[finite], bits[finite]]))]
        idx = idx[np.argsort(bits[idx])]
        space = archive.space
        rows = []
        for i in idx:
            rec = archive.records[i]
            rows.append(
                {
                    "avg_bits": rec.avg_bits,
                    "avg_bits_weights_only": rec.avg_bits_weights_only,
                    metric_name: rec.metric,
                    "iteration": rec.iteration,
                    "genes": rec.genes.tolist(),
                    "config": space.to_config(rec.genes).to_dict(),
                }
            )
        atomic_write_json(
            self.path("front.json"),
            {"metric": metric_name, "bits_convention": CONVENTION_WITH_META, "weights_only_convention": CONVENTION_WEIGHTS_ONLY, "front": rows},
        )
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["avg_bits", "avg_bits_weights_only", metric_name, "iteration", "genes"])
        for r in rows:
            w.writerow([f"{r['avg_bits']:.6f}", f"{r['avg_bits_weights_only']:.6f}", f"{r[metric_name]:.8g}", r["iteration"], "".join(map(str, r["genes"]))])
        atomic_write_text(self.path("front.csv"), buf.getvalue())
        if not plot:
            return rows
        iters = np.array([r.iteration for r in archive.records])
        plot_front(self.path("front.png"), bits, y, iters, idx, metric_name, title, f"average bits ({CONVENTION_WITH_META})", targets, uniform_points(archive))
        return rows

    def write_predictor_plot(self, archive: Archive, metric_name: str, title: str) -> Path | None:
        """predictor.png from every record a predictor proposed (its `predicted` value against the
        measured metric); None, and no file, before any such record is evaluated."""
        recs = [r for r in archive.records if r.predicted is not None and r.predicted > 0 and np.isfinite(r.metric) and r.metric > 0]
        if not recs:
            return None
        path = self.path(PREDICTOR_PLOT)
        plot_predictions(
            path,
            np.array([r.predicted for r in recs]),
            np.array([r.metric for r in recs]),
            np.array([r.iteration for r in recs]),
            metric_name,
            title,
        )
        return path


def uniform_points(archive: Archive) -> list[UniformPoint]:
    """The archive's uniform configurations (`SearchSpace.uniform` of each width; pinned linears keep
    theirs) that were evaluated successfully: the baselines the front is read against."""
    space = archive.space
    by_key = {space.key(r.genes): r for r in archive.records}
    out = []
    for width in space.bit_choices:
        rec = by_key.get(space.key(space.uniform(width)))
        if rec is not None and np.isfinite(rec.metric):
            out.append(UniformPoint(int(width), rec.avg_bits, rec.metric))
    return out
