"""The AMQ search, end to end: `python -m amq.train_search [overrides]` or `amq-search [overrides]`.

`run(cfg)` reads top to bottom: load the model and data, build the proxy, measure sensitivity and
prune, search, write the front. It returns the final hypervolume (what a Hydra sweeper optimises).
A run can be stopped at any moment and continued with `resume=<run dir>` or `resume=auto`
(amq/resume.py); SIGINT/SIGTERM stop it after the evaluation in flight (amq/interrupts.py).

`budget.max_minutes` limits the whole run as the user waits for it, counted from the start of
`run()`: model loading, proxy and sensitivity count, the search stops at an iteration boundary so
as to end within the limit (at most one iteration past it), and the finalize stage runs after.
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
from amq.config_check import check_settings
from amq.errors import ConfigError, ResourceError
from amq.faults import resource_errors
from amq.interrupts import GracefulStop, Interrupted
from amq.io import atomic_write_json, atomic_write_text
from amq.pipeline import build, check_finalize_components, evaluation_context, finalize_settings, finalizer_for, prepare, prune, search_settings
from amq.resume import TIME_LIMIT, check_resumable, continue_past_time_limit, resume_command
from amq.run_outputs import ARCHIVE_FILE, CONFIG_FILE, STATE_FILE, SUMMARY_FILE, RunOutputs
from amq.search.archive import Archive
from amq.search.eval_cache import with_cache
from amq.search.evaluator import ProxyEvaluator
from amq.search.loop import IterativeSearch, search_bits_range
from amq.search.pareto import HV_CONVENTION, best_under_target
from amq.search.seeding import SEED_ALLOCATORS, sensitivity_seeds
from amq.tracking import artifact_paths, summary_values

log = logging.getLogger("amq")

# An absolute path: works the same for `python -m amq.train_search` and the `amq-search` script.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _continues(cfg: DictConfig, run_dir: Path) -> bool:
    """Whether this run continues an earlier one in `run_dir` (checked: same settings, unfinished)."""
    if not cfg.resume:
        return False
    if cfg.resume == "auto":
        if not (run_dir / CONFIG_FILE).is_file():
            return False  # no unfinished run with these settings: a new one
    elif Path(str(cfg.resume)).expanduser().absolute() != run_dir.absolute():
        check_resumable(Path(str(cfg.resume)), cfg)  # the reason it wasn't chosen as the run directory
        raise ConfigError("resume", f"continues in its own directory, but paths.output_dir is {run_dir}", "leave paths.output_dir unset when resuming")
    check_resumable(run_dir, cfg)
    return True


def search_deadline(max_minutes: object, started: float) -> float | None:
    """The time.monotonic() value the search must end by, `budget.max_minutes` after `started` (None: no limit)."""
    if max_minutes is None:
        return None
    if isinstance(max_minutes, bool) or not isinstance(max_minutes, (int, float)) or not max_minutes > 0:
        raise ConfigError(TIME_LIMIT, f"{max_minutes!r}", "a number of minutes > 0, or null for no limit")
    return started + 60.0 * float(max_minutes)


def run(cfg: DictConfig) -> float:
    started = time.monotonic()  # the time limit counts the whole run, model loading included
    run_dir = Path(cfg.paths.output_dir)
    new_dir = not (run_dir / CONFIG_FILE).is_file()  # Hydra just made it: remove it again on a user error
    try:
        check_settings(cfg, CONF_DIR)
        resuming = _continues(cfg, run_dir)
        with GracefulStop() as stop, resource_errors(cfg, run_dir):
            return _run(cfg, RunOutputs(run_dir), resuming, stop, started)
    except ConfigError:
        if new_dir:
            _remove_fresh_run_dir(run_dir)
        raise
    except Interrupted as exc:
        log.warning("%s; every finished evaluation is saved in %s. Continue with:\n  %s", exc, run_dir, resume_command(run_dir))
        raise


def _run(cfg: DictConfig, outputs: RunOutputs, resuming: bool, stop: GracefulStop, started: float) -> float:
    run_dir = outputs.dir
    if resuming:
        outputs.remove_stale_temps()
    else:
        atomic_write_text(outputs.path(CONFIG_FILE), OmegaConf.to_yaml(cfg, resolve=True))

    # ---- search components first: bad settings fail before anything expensive
    make_predictor = build(cfg.predictor, "predictor")
    try:
        make_predictor(seed=0)  # a partial: construct once now so its settings fail fast
    except TypeError as exc:
        raise ConfigError("predictor", str(exc), "the keys documented in conf/predictor/") from None
    pruning = build(cfg.search.pruning, "search")
    settings = search_settings(cfg)
    tracker = build(cfg.logger, "logger")
    finalize = finalize_settings(cfg.finalize) if cfg.finalize.enabled else None
    if finalize is not None:
        check_finalize_components(cfg)  # before the search
    eval_cache = build(cfg.eval_cache, "eval_cache")
    for key in ("seed", "data_seed"):
        if int(cfg[key]) < 0:
            raise ConfigError(key, f"{cfg[key]}", "an integer >= 0")
    if int(cfg.search.sensitivity_seeds) < 0:
        raise ConfigError("search.sensitivity_seeds", f"{cfg.search.sensitivity_seeds}", "an integer >= 0 (0: the reference's uniform + random initial design)")
    if cfg.search.seed_allocator not in SEED_ALLOCATORS:
        raise ConfigError("search.seed_allocator", f"{cfg.search.seed_allocator!r}", " or ".join(SEED_ALLOCATORS))
    deadline = search_deadline(cfg.budget.max_minutes, started)

    # ---- model, data, proxy, metric; then sensitivity and pruning
    wb = prepare(cfg)
    lm, layout, metric, bank, targets = wb.lm, wb.layout, wb.metric, wb.bank, wb.targets
    table, space = prune(wb, pruning, int(cfg.budget.sensitivity_samples), cfg.search.share_groups)
    space_fp = space.fingerprint(lm.fingerprint)
    state = outputs.read_state()
    if state is not None and state["space_fingerprint"] != space_fp:
        raise ConfigError("resume", f"{run_dir} was searched over a different model or search space", "the same model, bits, group size, data and pruning settings as the original run")
    if state is None and outputs.archive_path.exists():
        raise ConfigError("resume", f"{run_dir} has an archive but no {STATE_FILE}", "restore it, or start a new run")

    if finalize is not None:
        finalize.check_reachable(space)  # after pruning: the smallest configuration may have grown

    # ---- run directory: the search's checkpoint exists from here on
    atomic_write_json(outputs.path("sensitivity.json"), {**table.to_dict(), "threshold": pruning.threshold, "keep_top": pruning.keep_top, "pruned": space.pruned})
    start = int(state["last_completed_iteration"]) + 1 if state else 0
    if state is None:
        outputs.write_state({"space_fingerprint": space_fp, "last_completed_iteration": -1, "seed": int(cfg.seed)})
    outputs.path(SUMMARY_FILE).unlink(missing_ok=True)  # a continued run is not finished until it writes it again
    archive = Archive(space, outputs.archive_path)
    n_loaded = archive.load(metric.name)
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
        evaluate=with_cache(ProxyEvaluator(bank, metric, space), eval_cache, evaluation_context(wb), space),
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
        evaluation_guard=stop.deferred,
        deadline=deadline,
    )
    tracker.start(str(run_dir), OmegaConf.to_container(cfg, resolve=True), name=run_dir.name)
    failed = True
    try:
        t_search = time.perf_counter()
        search.run(start)
        search_s = time.perf_counter() - t_search
        if search.stopped:
            log.info(
                "search stopped on its time limit (%s=%g, counted from this run's start) after iteration %d of %d; the front so far is written. "
                "Continue it with no limit (or a new one, counted from the continued run's start): %s",
                TIME_LIMIT, cfg.budget.max_minutes, search.stopped["after_iteration"], search.stopped["of"], continue_past_time_limit(run_dir),
            )
        front = outputs.write_front(archive, metric.name, title)
        summary = _summary(
            cfg, lm, layout, space, archive, metric, wb.splits.description, table, bank, rows, front, targets, search.stopped, search_s, time.monotonic() - started
        )
        atomic_write_json(outputs.path("summary.json"), summary)
        if finalize is not None:
            bank.restore()
            report = finalizer_for(cfg, wb, run_dir, metric.name).run(list(space.bit_choices))
            summary["finalize"] = finalize_summary(report)
            atomic_write_json(outputs.path("summary.json"), summary)
        tracker.summary(summary_values(summary))
        tracker.log_artifacts(artifact_paths(run_dir))
        failed = False
    finally:
        tracker.finish(failed=failed)
    evals = summary["evaluations"]
    if evals["reused_from_cache"]:
        log.info("evaluation cache: reused %d of %d evaluations", evals["reused_from_cache"], evals["archived"])
    log.info("front: %d configurations in %s (front.json, front.csv, front.png)", len(front), run_dir)
    return float(rows[-1]["hypervolume"])


def finalize_summary(report: dict) -> dict:
    """The finalize stage in summary.json: per exported model, where it is and how it scored."""
    models = {f"{r['target']:g}": {k: r.get(k) for k in ("dir", "avg_bits", "avg_bits_weights_only", "perplexity", "zero_shot", "bytes_on_disk")}
              for r in report["rows"] if r["kind"] == "target"}
    return {"models": models, "proxy_fidelity": report["proxy_fidelity"], "seconds": report["seconds"]}


def _summary(cfg, lm, layout, space, archive, metric, data_desc, table, bank, rows, front, targets, stopped, search_s, total_s) -> dict:
    _, y, bits = archive.arrays()
    best = {}
    for t in targets:
        idx = best_under_target(np.where(np.isfinite(y), y, np.inf), bits, t)
        if idx is not None:
            rec = archive.records[idx]
            best[f"{t:g}"] = {"avg_bits": rec.avg_bits, "avg_bits_weights_only": rec.avg_bits_weights_only, metric.name: rec.metric, "iteration": rec.iteration}
    evals = [r.seconds for r in archive.records if not r.reused]
    return {
        "model": {"name": lm.name, "fingerprint": lm.fingerprint, "blocks": layout.n_blocks, "linears": len(layout.linears)},
        "protocol": {
            "data": data_desc,
            "calibration": {"n_samples": int(cfg.budget.n_samples), "seq_len": int(cfg.budget.seq_len), "seed": int(cfg.data_seed)},
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
            "share_groups": OmegaConf.to_container(cfg.search.share_groups) if cfg.search.share_groups else None,
        },
        "final_hypervolume": rows[-1]["hypervolume"],
        "stopped": stopped,  # {"reason": "max_minutes", "after_iteration": k, "of": N}: the time limit ended the search early; null: it ran to its end
        "true_evaluations": len(archive),
        "evaluations": {
            "archived": len(archive),
            "reused_from_cache": sum(r.reused for r in archive.records),
            "failed": sum(r.failure is not None for r in archive.records),
            "cache": OmegaConf.to_container(cfg.eval_cache, resolve=True),
        },
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
    """After a user error in a new run, before its checkpoint existed, remove the directory Hydra made."""
    if run_dir.is_dir() and not any((run_dir / n).exists() for n in (STATE_FILE, ARCHIVE_FILE)):
        shutil.rmtree(run_dir, ignore_errors=True)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train_search")
def main(cfg: DictConfig) -> float:
    try:
        return run(cfg)
    except (ConfigError, ResourceError) as exc:
        log.error("%s", exc)
        sys.exit(exc.exit_code)
    except Interrupted as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
