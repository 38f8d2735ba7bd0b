"""summary.json: what a finished (or time-limited) search found, under which protocol, at what cost."""

from __future__ import annotations

import resource
from typing import Any

import numpy as np

from amq.bits import CONVENTION_WEIGHTS_ONLY, CONVENTION_WITH_META
from amq.search.archive import Archive
from amq.search.confirmation import Confirmations, confirmed_pick
from amq.search.pareto import HV_CONVENTION


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def best_at_targets(archive: Archive, targets: list[float], metric_name: str, confirmations: Confirmations | None = None) -> dict[str, dict]:
    """Per target, the archived configuration a run ships: the best within it, or, where the
    confirmation pass ran, the best over both sets of windows (`confirmed_<metric>`)."""
    _, y, bits = archive.arrays()
    y = np.where(np.isfinite(y), y, np.inf)
    confirmed = confirmations.combined_array() if confirmations is not None else np.full(len(y), np.nan)
    confirmed = np.where(np.isinf(confirmed), np.nan, confirmed)
    best = {}
    for t in targets:
        idx = confirmed_pick(y, bits, confirmed, t)
        if idx is not None:
            rec = archive.records[idx]
            best[f"{t:g}"] = {"avg_bits": rec.avg_bits, "avg_bits_weights_only": rec.avg_bits_weights_only, metric_name: rec.metric, "iteration": rec.iteration}
            if np.isfinite(confirmed[idx]):
                best[f"{t:g}"][f"confirmed_{metric_name}"] = float(confirmed[idx])
    return best


def confirmation_values(result: dict, metric_name: str) -> dict[str, float]:
    """The confirmation pass as flat tracker values: per target the confirmed metric and whether the pick changed."""
    out: dict[str, float] = {"confirm/measured": result["measured"], "confirm/tokens": result["tokens"], "confirm/seconds": result["seconds"]}
    for t, row in result["targets"].items():
        if row["combined"] is not None:
            out[f"confirm/{metric_name}@{t}"] = row["combined"]
        out[f"confirm/changed@{t}"] = int(row["changed"])
    return out


def search_summary(
    plan: Any,
    wb: Any,
    table: Any,
    space: Any,
    archive: Archive,
    rows: list[dict],
    front: list[dict],
    stopped: dict | None,
    search_s: float,
    total_s: float,
    confirmation: tuple[dict, Confirmations] | None = None,
) -> dict:
    """summary.json of a search (`plan`: amq.config.compose.SearchPlan, `wb`: its Workbench;
    `confirmation`: the confirmation pass's result and measurements, None where it did not run)."""
    lm, layout, metric, bank = wb.lm, wb.layout, wb.metric, wb.bank
    calib = plan.calibration
    evals = [r.seconds for r in archive.records if not r.reused]
    return {
        "model": {
            "name": lm.name,
            "fingerprint": lm.fingerprint,
            "blocks": layout.n_blocks,
            "linears": len(layout.linears),
            "searched_fraction": wb.coverage.fraction,  # of the decoder's weight matrices
        },
        "protocol": {
            "data": wb.splits.description,
            "calibration": {"n_samples": calib.n_samples, "seq_len": calib.seq_len, "seed": calib.seed},
            "metric": metric.description,
            "model_dtype": str(lm.model.dtype).replace("torch.", ""),
            "compute_dtype": {**lm.compute.record(), "device": lm.device.type},
            "bits_convention": CONVENTION_WITH_META,
            "weights_only_convention": CONVENTION_WEIGHTS_ONLY,
            "hypervolume": HV_CONVENTION,
        },
        "space": {
            "bits": list(space.bit_choices),
            "group_size": space.group_size,
            "genes": space.n_genes,
            "pruned": len(space.pruned),
            "pinned": len(space.pinned),
            "keep_top": space.keep_top,
            "bits_range": list(space.bits_range()),
            "share_groups": plan.share_groups,
            "expert_genes": plan.expert_genes,
        },
        "final_hypervolume": rows[-1]["hypervolume"],
        "stopped": stopped,  # {"reason": "max_minutes", "after_iteration": k, "of": N}: the time limit ended the search early; null: it ran to its end
        "true_evaluations": len(archive),
        "evaluations": {
            "archived": len(archive),
            "reused_from_cache": sum(r.reused for r in archive.records),
            "failed": sum(r.failure is not None for r in archive.records),
            "cache": plan.eval_cache_record,
        },
        "front_size": len(front),
        "best_at_target": best_at_targets(archive, wb.targets, metric.name, confirmation and confirmation[1]),
        "confirmation": confirmation and confirmation[0],  # null: the pass was off (search.confirm.samples=0) or the time limit stopped the search
        "seconds": {
            "total": total_s,
            "proxy_build": bank.build_seconds,
            "sensitivity": table.seconds,
            "search": search_s,
            "mean_true_evaluation": float(np.mean(evals)) if evals else None,
        },
        "proxy_memory_mb": bank.memory_bytes() / 2**20,
        "peak_rss_mb": peak_rss_mb(),
    }


def finalize_summary(report: dict) -> dict:
    """The finalize stage in summary.json: per exported model, where it is and how it scored."""
    models = {
        f"{r['target']:g}": {k: r.get(k) for k in ("dir", "avg_bits", "avg_bits_weights_only", "perplexity", "zero_shot", "bytes_on_disk")}
        for r in report["rows"]
        if r["kind"] == "target"
    }
    # the protocol of those numbers: data, held-out preparation, window, windows, tasks and shots
    return {"models": models, "protocol": report["protocol"], "proxy_fidelity": report["proxy_fidelity"], "seconds": report["seconds"]}
