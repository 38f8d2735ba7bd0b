"""`amq-compare <run dirs or multirun dirs>`: several searches side by side, with no W&B account.

Reads only what every run directory holds (front.json, metrics.jsonl, summary.json, config.yaml,
.hydra/overrides.yaml), draws all fronts on one plot and writes a table (markdown and CSV) of
final hypervolume, best metric at each target, true evaluations and wall time. A run that is
still going or failed (no summary.json yet) is shown from its last metrics row, marked incomplete.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from amq.bits import CONVENTION_WITH_META
from amq.io import atomic_write_bytes_with, atomic_write_text, read_jsonl

log = logging.getLogger(__name__)

RUN_MARKERS = ("front.json", "metrics.jsonl")  # what makes a directory a (started) run


class NotARunError(ValueError):
    """A path given to amq-compare holds neither a run nor runs."""


@dataclass
class RunRecord:
    path: Path
    label: str
    metric: str
    front_bits: np.ndarray
    front_metric: np.ndarray
    overrides: list[str]
    final_hypervolume: float | None
    best: dict[str, float | None]  # target (as written in summary.json, e.g. "4.5") -> metric
    true_evaluations: int | None
    wall_seconds: float | None
    complete: bool
    shown_overrides: list[str] = field(default_factory=list)


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and all((path / m).is_file() for m in RUN_MARKERS)


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Expand each path: a run directory stays, a multirun directory yields its job directories."""
    runs: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if not p.is_dir():
            raise NotARunError(f"{p} is not a directory")
        if is_run_dir(p):
            runs.append(p)
            continue
        jobs = sorted((c for c in p.iterdir() if is_run_dir(c)), key=_job_sort_key)
        if not jobs:
            raise NotARunError(
                f"{p} is not an amq run directory (no {' and '.join(RUN_MARKERS)}) and holds no run "
                f"directories; pass outputs/search/runs/<time> or outputs/search/multiruns/<time>_<sweep>"
            )
        runs.extend(jobs)
    return runs


def _job_sort_key(p: Path) -> tuple[int, str]:
    return (int(p.name), "") if p.name.isdigit() else (1 << 30, p.name)


def load_run(path: Path, label: str) -> RunRecord:
    front_doc = json.loads((path / "front.json").read_text())
    metric = front_doc["metric"]
    front = front_doc.get("front", [])
    rows = list(read_jsonl(path / "metrics.jsonl"))
    summary_path = path / "summary.json"
    summary: dict[str, Any] | None = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    last = rows[-1] if rows else {}
    if summary is not None:
        hv = summary.get("final_hypervolume")
        best = {t: b.get(metric) for t, b in summary.get("best_at_target", {}).items()}
        evals = summary.get("true_evaluations")
        wall = summary.get("seconds", {}).get("total")
    else:
        hv = last.get("hypervolume")
        prefix = f"best/{metric}@"
        best = {k[len(prefix) :]: v for k, v in last.items() if k.startswith(prefix)}
        evals = last.get("n_evaluated")
        wall = None
    for t in _targets_from_config(path):  # targets with no configuration under them still get a column
        best.setdefault(t, None)
    return RunRecord(
        path=path,
        label=label,
        metric=metric,
        front_bits=np.array([r["avg_bits"] for r in front], dtype=float),
        front_metric=np.array([r[metric] for r in front], dtype=float),
        overrides=_overrides(path),
        final_hypervolume=hv,
        best=best,
        true_evaluations=evals,
        wall_seconds=wall,
        complete=summary is not None,
    )


def _overrides(path: Path) -> list[str]:
    f = path / ".hydra" / "overrides.yaml"
    if not f.is_file():
        return []
    return [str(o) for o in (yaml.safe_load(f.read_text()) or [])]


def _targets_from_config(path: Path) -> list[str]:
    f = path / "config.yaml"
    if not f.is_file():
        return []
    cfg = yaml.safe_load(f.read_text()) or {}
    return [f"{float(t):g}" for t in (cfg.get("search", {}) or {}).get("targets", []) or []]


def _labels(runs: list[Path]) -> list[str]:
    """Shortest distinguishing names: the path below the runs' common parent."""
    if len(runs) == 1:
        return [runs[0].name]
    parents = {r.parent for r in runs}
    if len(parents) == 1:
        return [r.name for r in runs]
    common = Path(*[parts[0] for parts in zip(*(r.resolve().parts for r in runs)) if len(set(parts)) == 1])
    return [str(r.resolve().relative_to(common)) for r in runs]


def _mark_varying_overrides(records: list[RunRecord]) -> None:
    """Show only the overrides that differ between runs (the ones a comparison is about)."""
    if len(records) < 2:
        for r in records:
            r.shown_overrides = r.overrides
        return
    common = set.intersection(*(set(r.overrides) for r in records))
    for r in records:
        r.shown_overrides = [o for o in r.overrides if o not in common]


def table_rows(records: list[RunRecord]) -> tuple[list[str], list[list[str]]]:
    metric = records[0].metric
    targets = sorted({t for r in records for t in r.best}, key=float)
    header = ["run", "overrides", "final hypervolume", *[f"best {metric} @{t}" for t in targets], "true evaluations", "wall s"]
    rows = []
    for r in records:
        rows.append(
            [
                r.label + ("" if r.complete else " (incomplete)"),
                " ".join(r.shown_overrides) or "-",
                _fmt(r.final_hypervolume, ".4f"),
                *[_fmt(r.best.get(t), ".4g") for t in targets],
                _fmt(r.true_evaluations, "d"),
                _fmt(r.wall_seconds, ".1f"),
            ]
        )
    return header, rows


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def to_markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_csv(header: list[str], rows: list[list[str]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def plot_fronts(path: Path, records: list[RunRecord]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = records[0].metric
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for r in records:
        ok = np.isfinite(r.front_metric) & (r.front_metric > 0)
        order = np.argsort(r.front_bits[ok])
        label = r.label + (f": {' '.join(r.shown_overrides)}" if r.shown_overrides else "")
        ax.step(r.front_bits[ok][order], r.front_metric[ok][order], where="post", marker="o", ms=3, lw=1.3, label=label)
    ax.set_yscale("log")
    ax.set_xlabel(f"average bits ({CONVENTION_WITH_META})")
    ax.set_ylabel(f"{metric} (log scale, lower is better)")
    ax.set_title(f"Pareto fronts of {len(records)} runs", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    atomic_write_bytes_with(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def compare(paths: Sequence[str | Path], out_dir: str | Path | None = None) -> tuple[str, dict[str, Path]]:
    """Compare runs; write compare.png, compare.md, compare.csv. Returns the markdown and the files.

    The files go to `out_dir`, by default the single multirun directory given (or, for several
    paths, the current directory).
    """
    runs = find_runs(paths)
    records = [load_run(p, label) for p, label in zip(runs, _labels(runs))]
    metrics = {r.metric for r in records}
    if len(metrics) > 1:
        raise NotARunError(f"the runs use different metrics ({', '.join(sorted(metrics))}); compare runs of one metric")
    _mark_varying_overrides(records)
    if out_dir is None:
        only = Path(paths[0]) if len(paths) == 1 else None
        out_dir = only if only is not None and not is_run_dir(only) else Path.cwd()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header, rows = table_rows(records)
    md = to_markdown(header, rows)
    files = {"png": out / "compare.png", "md": out / "compare.md", "csv": out / "compare.csv"}
    plot_fronts(files["png"], records)
    atomic_write_text(files["md"], md)
    atomic_write_text(files["csv"], to_csv(header, rows))
    log.info("compared %d runs: %s", len(records), ", ".join(str(f) for f in files.values()))
    return md, files


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="amq-compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="run directories and/or multirun directories")
    ap.add_argument("-o", "--out", default=None, help="where compare.png/.md/.csv go (default: the multirun dir, else .)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        md, files = compare(args.paths, args.out)
    except NotARunError as exc:
        print(f"amq-compare: {exc}", file=sys.stderr)
        return 2
    print(md, end="")
    print(f"\nwrote {files['png']}, {files['md']}, {files['csv']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
