"""What a finished search hands to its tracker: summary values and the result files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Result files attached to the tracker run (see outputs/README.md). front.json carries the bit
# configuration of every front point, so the selected model at each target is among them.
RUN_ARTIFACTS = (
    "archive.jsonl",
    "front.json",
    "sensitivity.json",
    "summary.json",
    "evaluation.json",
    "evaluation.md",
    "perplexity_vs_bits.png",
    "proxy_vs_perplexity.png",
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
    for target, model in summary.get("finalize", {}).get("models", {}).items():
        for text, ppl in (model.get("perplexity") or {}).items():
            out[f"final/ppl_{text}@{target}"] = ppl
        for task, acc in (model.get("zero_shot") or {}).items():
            out[f"final/acc_{task}@{target}"] = acc
        out[f"final/mib_on_disk@{target}"] = model["bytes_on_disk"] / 2**20 if model.get("bytes_on_disk") else None
    return {k: v for k, v in out.items() if v is not None}


def artifact_paths(run_dir: str | Path) -> list[Path]:
    """The existing RUN_ARTIFACTS of a run directory."""
    run_dir = Path(run_dir)
    return [run_dir / n for n in RUN_ARTIFACTS if (run_dir / n).is_file()]
