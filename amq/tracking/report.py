"""What a finished search, finalize or evaluate stage hands to its tracker: summary values, result
files, the evaluation table, and the identity and metadata of every exported model.

Plain data only (no W&B objects), read from the files each stage writes (outputs/README.md), so
the same values serve the search's own finalize stage, `amq-finalize` and `amq-evaluate`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

from amq.bits import average_bits

# Result files attached to the tracker run (see outputs/README.md). front.json carries the bit
# configuration of every front point, so the selected model at each target is among them.
RUN_ARTIFACTS = (
    "archive.jsonl",
    "confirm.jsonl",
    "front.json",
    "sensitivity.json",
    "summary.json",
    "evaluation.json",
    "evaluation.md",
    "perplexity_vs_bits.png",
    "proxy_vs_perplexity.png",
    "predictor.png",
)


def summary_values(summary: dict[str, Any]) -> dict[str, Any]:
    """Flatten summary.json into the handful of numbers a dashboard compares runs by."""
    out: dict[str, Any] = {
        "final_hypervolume": summary["final_hypervolume"],
        "true_evaluations": summary["true_evaluations"],
        "front_size": summary["front_size"],
        "evaluations_reused": summary.get("evaluations", {}).get("reused_from_cache"),
        "evaluations_failed": summary.get("evaluations", {}).get("failed"),
        "search_seconds": summary["seconds"]["search"],
        "total_seconds": summary["seconds"]["total"],
        "peak_rss_mb": summary.get("peak_rss_mb"),
    }
    for target, best in summary.get("best_at_target", {}).items():
        for key, value in best.items():  # the metric (as in metrics.jsonl) and both bit counts
            if key != "iteration":
                out[f"{'best_bits' if key.startswith('avg_bits') else 'best'}/{key}@{target}"] = value
    out.update(final_values(summary.get("finalize") or {}))
    return {k: v for k, v in out.items() if v is not None}


def final_values(finalize: Mapping[str, Any]) -> dict[str, Any]:
    """summary.json's `finalize` section (amq.run.summary.finalize_summary) as flat numbers per target."""
    out: dict[str, Any] = {}
    for target, model in (finalize.get("models") or {}).items():
        for text, ppl in (model.get("perplexity") or {}).items():
            out[f"final/ppl_{text}@{target}"] = ppl
        for task, acc in (model.get("zero_shot") or {}).items():
            out[f"final/acc_{task}@{target}"] = acc
        if model.get("bytes_on_disk"):
            out[f"final/mib_on_disk@{target}"] = model["bytes_on_disk"] / 2**20
    return {k: v for k, v in out.items() if v is not None}


def artifact_paths(run_dir: str | Path) -> list[Path]:
    """The existing RUN_ARTIFACTS of a run directory."""
    run_dir = Path(run_dir)
    return [run_dir / n for n in RUN_ARTIFACTS if (run_dir / n).is_file()]


# ---------------------------------------------------------------------------- the finalize stage
EVALUATION_FILE = "evaluation.json"  # amq.evaluation.report.write_report
MODELS_DIR = "models"
QUANT_FILE = "amq_quant.json"  # amq.quantizers.export: what marks a model directory
BITCONFIG_FILE = "bit_config.json"
MODEL_CARD = "README.md"
MIXED_KINDS = ("target", "front")  # evaluation.json rows of searched (mixed-precision) configurations


def read_report(output_dir: str | Path) -> dict | None:
    """The finalize stage's evaluation.json in `output_dir` (a run or a finalized/<time>/ directory), or None."""
    path = Path(output_dir) / EVALUATION_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def exported_models(output_dir: str | Path) -> list[Path]:
    """The model directories under `output_dir`/models/, in order of their names."""
    base = Path(output_dir) / MODELS_DIR
    return sorted(p.parent for p in base.glob(f"*/{QUANT_FILE}")) if base.is_dir() else []


def _names(rows: Sequence[Mapping[str, Any]], key: str) -> list[str]:
    return sorted({k for r in rows for k in (r.get(key) or {})})


def _label(row: Mapping[str, Any]) -> str:
    """How evaluation.md and the charts name a row: `target 4.5`, `uniform 3-bit`, `front`, `unquantized`."""
    if row["kind"] == "target":
        return f"target {row['target']:g}"
    if row["kind"] == "uniform":
        return f"uniform {row['avg_bits_weights_only']:g}-bit"
    return str(row["kind"])


def evaluation_table(report: Mapping[str, Any], artifacts: Mapping[str, str] | None = None) -> tuple[list[str], list[list[Any]]]:
    """evaluation.json's rows as one table (columns, rows), sorted by average bits: every exported
    model, front point and baseline with its held-out perplexity per text (`ppl/<text>`) and zero-shot
    accuracy per task (`acc/<task>`); `artifacts` maps a target (`4.5`) to its model artifact's name."""
    rows = list(report["rows"])
    proxy = report.get("proxy_fidelity", {}).get("proxy") or next((k for r in rows for k in r if k.startswith("proxy_")), "proxy")
    texts, tasks = _names(rows, "perplexity"), _names(rows, "zero_shot")
    columns = ["row", "kind", "target", "avg_bits", "avg_bits_weights_only", proxy, *(f"ppl/{t}" for t in texts), *(f"acc/{t}" for t in tasks)]
    columns += ["mib_on_disk", "model_artifact"]
    data = []
    for r in sorted(rows, key=lambda r: r["avg_bits"]):
        target = r.get("target")
        cells = [_label(r), r["kind"], target, r["avg_bits"], r["avg_bits_weights_only"], r.get(proxy)]
        cells += [(r.get("perplexity") or {}).get(t) for t in texts]
        cells += [(r.get("zero_shot") or {}).get(t) for t in tasks]
        cells.append(r["bytes_on_disk"] / 2**20 if r.get("bytes_on_disk") else None)
        cells.append((artifacts or {}).get(f"{target:g}") if target is not None else None)
        data.append(cells)
    return columns, data


def perplexity_series(report: Mapping[str, Any], text: str) -> dict[str, tuple[list[float], list[float]]]:
    """Held-out perplexity of `text` against average bits, as the chart draws it: the searched
    configurations (exported models and front points), the uniform widths, and the unquantized
    model as a level line across the same bits range. Empty series are left out."""
    rows = [r for r in report["rows"] if text in (r.get("perplexity") or {})]

    def series(kinds: Sequence[str]) -> tuple[list[float], list[float]]:
        pts = sorted((r["avg_bits"], r["perplexity"][text]) for r in rows if r["kind"] in kinds)
        return [x for x, _ in pts], [y for _, y in pts]

    out = {"amq (exported + front)": series(MIXED_KINDS), "uniform": series(("uniform",))}
    quantized = [x for xs, _ in out.values() for x in xs]
    base = [r["perplexity"][text] for r in rows if r["kind"] == "unquantized"]
    if base and quantized:
        out["unquantized"] = ([min(quantized), max(quantized)], [base[0], base[0]])
    return {k: v for k, v in out.items() if v[0]}


def model_metadata(model_dir: str | Path, report: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What identifies an exported model: its bit configuration, average bits (both conventions),
    final quantizer and, from the stage's report when given, its target, proxy metric and scores."""
    model_dir = Path(model_dir)
    manifest = json.loads((model_dir / QUANT_FILE).read_text())
    modules = manifest["modules"]
    bits = {n: int(m["bits"]) for n, m in modules.items()}
    numels = {n: int(m["in_features"]) * int(m["out_features"]) for n, m in modules.items()}
    group = int(manifest["group_size"])
    meta: dict[str, Any] = {
        "target": _target(model_dir.name),
        "avg_bits": average_bits(bits, numels, group),
        "avg_bits_weights_only": average_bits(bits, numels, group, with_meta=False),
        "group_size": group,
        "linears_per_width": {str(b): n for b, n in sorted(Counter(bits.values()).items())},
        "finalizer": manifest.get("quantizer"),
        "dtype": manifest.get("dtype"),
    }
    if (model_dir / BITCONFIG_FILE).is_file():
        meta["bit_config"] = json.loads((model_dir / BITCONFIG_FILE).read_text())
    if report is not None:
        meta["model"] = report.get("model")
        meta["bits_convention"] = report.get("bits_convention")
        row = next((r for r in report["rows"] if r["kind"] == "target" and Path(str(r.get("dir", ""))).name == model_dir.name), None)
        if row is not None:  # the stage's own figures (the same bits, computed over the model's layout)
            meta.update({k: v for k, v in row.items() if k not in ("kind", "dir") and v is not None})
    return meta


def _target(name: str) -> float | None:
    try:
        return float(name)
    except ValueError:
        return None


def model_artifact_name(meta: Mapping[str, Any], fallback_model: str = "model") -> str:
    """The W&B artifact (collection) name of an exported model: `<model>-<finalizer>-<target>bit`.
    Exports of the same model, quantizer and budget become versions of one collection."""
    finalizer = (meta.get("finalizer") or {}).get("name", "quantized")
    target = meta.get("target")
    bits = f"{target:g}" if target is not None else f"{meta['avg_bits']:.3f}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{meta.get('model') or fallback_model}-{finalizer}-{bits}bit").strip("-")


# ---------------------------------------------------------------------------- amq-evaluate
def reevaluation_table(results: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """amq-evaluate's results (one eval.json per model) as one table: the model, its bits and final
    quantizer, perplexity per text, zero-shot accuracy per task, and the relative difference from
    the earlier evaluation it was compared with (`rel_diff/<text>`)."""
    texts, tasks = _names(results, "perplexity"), _names(results, "zero_shot")
    columns = ["model_dir", "target", "avg_bits", "avg_bits_weights_only", "finalizer", *(f"ppl/{t}" for t in texts), *(f"acc/{t}" for t in tasks)]
    columns += [f"rel_diff/{t}" for t in texts]
    data = []
    for r in results:
        meta = model_metadata(r["model_dir"])
        cells = [str(r["model_dir"]), meta["target"], meta["avg_bits"], meta["avg_bits_weights_only"], (meta["finalizer"] or {}).get("name")]
        cells += [((r.get("perplexity") or {}).get(t) or {}).get("perplexity") for t in texts]
        cells += [((r.get("zero_shot") or {}).get(t) or {}).get("acc") for t in tasks]
        cells += [((r.get("reproduction") or {}).get(t) or {}).get("rel_diff") for t in texts]
        data.append(cells)
    return columns, data
