"""The AMQ search, end to end: `python -m amq.train_search [overrides]` or `amq-search [overrides]`.

`run(cfg)` reads top to bottom: load the model and data, build the proxy, measure sensitivity and
prune, search, write the front. It returns the final hypervolume (what a Hydra sweeper optimises).
"""

from __future__ import annotations

import logging
import resource
import shutil
import sys
import time
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from amq.bits import CONVENTION_WEIGHTS_ONLY, CONVENTION_WITH_META
from amq.errors import ConfigError
from amq.io import atomic_write_json, atomic_write_text
from amq.pipeline import build, prepare, prune, search_settings
from amq.run_outputs import RunOutputs
from amq.search.archive import Archive
from amq.search.evaluator import ProxyEvaluator
from amq.search.loop import IterativeSearch, search_bits_range
from amq.search.pareto import HV_CONVENTION, best_under_target
from amq.search.seeding import SEED_ALLOCATORS, sensitivity_seeds
from amq.tracking import artifact_paths, summary_values

log = logging.getLogger("amq")

OmegaConf.register_new_resolver("amq_run_dir", lambda resume, default: str(resume) if resume else default, replace=True)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run(cfg: DictConfig) -> float:
    t_start = time.perf_counter()
    run_dir = Path(cfg.paths.output_dir)
    resuming = bool(cfg.resume)
    outputs = RunOutputs(run_dir)
    state = outputs.read_state() if resuming else None
    if resuming and state is None:
        raise ConfigError("resume", f"{run_dir} holds no state.json of an earlier run", "the directory of an earlier amq-search run")

    # ---- search components first: bad settings fail before anything expensive
    make_predictor = build(cfg.predictor, "predictor")
    try:
        make_predictor(seed=0)  # a partial: construct once now so its settings fail fast
    except TypeError as exc:
        raise ConfigError("predictor", str(exc), "the keys documented in conf/predictor/") from None
    pruning = build(cfg.search.pruning, "search")
    settings = search_settings(cfg)
    tracker = build(cfg.logger, "logger")
    if int(cfg.search.sensitivity_seeds) < 0:
        raise ConfigError("search.sensitivity_seeds", f"{cfg.search.sensitivity_seeds}", "an integer >= 0 (0: the reference's uniform + random initial design)")
    if cfg.search.seed_allocator not in SEED_ALLOCATORS:
        raise ConfigError("search.seed_allocator", f"{cfg.search.seed_allocator!r}", " or ".join(SEED_ALLOCATORS))

    # ---- model, data, proxy, metric; then sensitivity and pruning
    wb = prepare(cfg)
    lm, layout, metric, bank, targets = wb.lm, wb.layout, wb.metric, wb.bank, wb.targets
    table, space = prune(wb, pruning, int(cfg.budget.sensitivity_samples), cfg.search.share_groups)
    space_fp = space.fingerprint(lm.fingerprint)
    if resuming and state.get("space_fingerprint") != space_fp:
        raise ConfigError("resume", f"{run_dir} was searched over a different model or search space", "the same model, bits, group size, data and pruning settings as the original run")

    # ---- run directory
    if not resuming:
        atomic_write_text(outputs.path("config.yaml"), OmegaConf.to_yaml(cfg, resolve=True))
    atomic_write_json(outputs.path("sensitivity.json"), {**table.to_dict(), "threshold": pruning.threshold, "keep_top": pruning.keep_top, "pruned": space.pruned})
    archive = Archive(space, outputs.archive_path)
    n_loaded = archive.load(metric.name)
    start = int(state["last_completed_iteration"]) + 1 if resuming else 0
    rows = outputs.read_metrics(start - 1)
    if resuming:
        log.info("resuming %s at iteration %d with %d archived configurations", run_dir, start, n_loaded)

    title = f"{lm.name}: {metric.name} vs bits ({cfg.predictor._target_.rsplit('.', 1)[-1]}, seed {cfg.seed})"

    def on_iteration(row: dict, arch: Archive) -> None:
        rows.append(row)
        outputs.write_metrics(rows)
        front = outputs.write_front(arch, metric.name, title)
        outputs.write_state({"space_fingerprint": space_fp, "last_completed_iteration": row["iteration"], "seed": int(cfg.seed)})
        tracker.log(row, step=row["iteration"])
        tracker.log_front(front, metric.name, outputs.path("front.png"), step=row["iteration"])

    search = IterativeSearch(
        space=space,
        evaluate=ProxyEvaluator(bank, metric, space),
        make_predictor=lambda seed: make_predictor(seed=seed),
        settings=settings,
        archive=archive,
        metric_name=metric.name,
        targets=targets,
        seed=int(cfg.seed),
        observers=[on_iteration],
        seeder=lambda uniform_metric: sensitivity_seeds(
            space, table.damage, int(cfg.search.sensitivity_seeds), search_bits_range(space, settings), targets, uniform_metric, cfg.search.seed_allocator
        ),
    )
    tracker.start(str(run_dir), OmegaConf.to_container(cfg, resolve=True), name=run_dir.name)
    failed = True
    try:
        t_search = time.perf_counter()
        search.run(start)
        search_s = time.perf_counter() - t_search
        if not rows:
            raise ConfigError("resume", f"{run_dir} is already complete (iteration {start - 1} of {settings.iterations})")
        front = outputs.write_front(archive, metric.name, title)
        summary = _summary(cfg, lm, layout, space, archive, metric, wb.splits.description, table, bank, rows, front, targets, search_s, time.perf_counter() - t_start)
        atomic_write_json(outputs.path("summary.json"), summary)
        tracker.summary(summary_values(summary))
        tracker.log_artifacts(artifact_paths(run_dir))
        failed = False
    finally:
        tracker.finish(failed=failed)
    log.info("front: %d configurations in %s (front.json, front.csv, front.png)", len(front), run_dir)
    return float(rows[-1]["hypervolume"])


def _summary(cfg, lm, layout, space, archive, metric, data_desc, table, bank, rows, front, targets, search_s, total_s) -> dict:
    _, y, bits = archive.arrays()
    best = {}
    for t in targets:
        idx = best_under_target(np.where(np.isfinite(y), y, np.inf), bits, t)
        if idx is not None:
            rec = archive.records[idx]
            best[f"{t:g}"] = {"avg_bits": rec.avg_bits, "avg_bits_weights_only": rec.avg_bits_weights_only, metric.name: rec.metric, "iteration": rec.iteration}
    evals = [r.seconds for r in archive.records]
    return {
        "model": {"name": lm.name, "fingerprint": lm.fingerprint, "blocks": layout.n_blocks, "linears": len(layout.linears)},
        "protocol": {
            "data": data_desc,
            "calibration": {"n_samples": int(cfg.budget.n_samples), "seq_len": int(cfg.budget.seq_len), "seed": int(cfg.data_seed)},
            "metric": metric.description,
            "model_dtype": str(lm.model.dtype).replace("torch.", ""),
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
            "share_groups": OmegaConf.to_container(cfg.search.share_groups) if cfg.search.share_groups else None,
        },
        "final_hypervolume": rows[-1]["hypervolume"],
        "true_evaluations": len(archive),
        "front_size": len(front),
        "best_at_target": best,
        "seconds": {
            "total": total_s,
            "proxy_build": bank.build_seconds,
            "sensitivity": table.seconds,
            "search": search_s,
            "mean_true_evaluation": float(np.mean(evals)) if evals else None,
        },
        "proxy_memory_mb": bank.memory_bytes() / 2**20,
        "peak_rss_mb": _peak_rss_mb(),
    }


def _remove_fresh_run_dir(run_dir: Path) -> None:
    """After a user error before any result was written, remove the run dir Hydra just created."""
    ours = {"config.yaml", "archive.jsonl", "state.json", "metrics.jsonl", "front.json", "sensitivity.json"}
    if run_dir.is_dir() and not any((run_dir / n).exists() for n in ours):
        shutil.rmtree(run_dir, ignore_errors=True)


# An absolute path: works the same for `python -m amq.train_search` and the `amq-search` script.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train_search")
def main(cfg: DictConfig) -> float:
    try:
        return run(cfg)
    except ConfigError as exc:
        log.error("%s", exc)
        if not cfg.resume:
            _remove_fresh_run_dir(Path(cfg.paths.output_dir))
        sys.exit(2)


if __name__ == "__main__":
    main()
