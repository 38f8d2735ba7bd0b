"""The AMQ search, end to end: `python -m amq.train_search [overrides]` or `amq-search [overrides]`.

`run(cfg)` reads top to bottom: check the settings, load the model and data, build the proxy,
measure sensitivity and prune, search, confirm the targets' near-ties (when on), write the front,
finalize. It returns the run's summary
(its final hypervolume is what a Hydra sweeper optimises) and the objects it built (assembled by
amq/config/compose.py, as tests and scripts assemble them). A stopped run continues with
`resume=<run dir>` or `resume=auto` (amq/run/). `budget.max_minutes` counts from the start of
`run()`; the search stops at an iteration boundary to end within it, and finalize runs after.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
from omegaconf import DictConfig

from amq.config import compose
from amq.errors import ConfigError, ResourceError
from amq.run.interrupts import Interrupted
from amq.run.resume import FINALIZE_PENDING
from amq.run.session import IterationObserver, RunSession
from amq.run.stage_clock import StageClock
from amq.run.summary import confirmation_values, finalize_summary, search_summary
from amq.search.archive import Archive
from amq.search.loop import IterativeSearch
from amq.search.sensitivity import SensitivityTable
from amq.search.space import SearchSpace
from amq.tracking import artifact_paths, summary_values

log = logging.getLogger("amq")


@dataclass
class SearchRun:
    """What `run()` built, for tests and scripts that go on from it."""

    plan: compose.SearchPlan
    workbench: compose.Workbench
    table: SensitivityTable
    space: SearchSpace
    archive: Archive
    search: IterativeSearch
    run_dir: Path
    clock: StageClock  # per-stage wall time and peak GPU memory (summary.json `stages`)
    observer: IterationObserver  # what each iteration writes and logs; draws the skipped plots at the end


def run(cfg: DictConfig) -> tuple[dict, SearchRun]:
    started = time.monotonic()  # the time limit counts the whole run, model loading included
    session = RunSession(Path(cfg.paths.output_dir))
    with session.open(compose.memory_settings(cfg)) as stop:
        plan = compose.plan(cfg)  # every setting that needs no model: bad ones fail before anything expensive
        session.check_resume(*compose.resume_settings(cfg))
        deadline = compose.search_deadline(plan.max_minutes, started)
        config_yaml, config = compose.config_record(cfg)
        session.begin(config_yaml)

        # ---- model, data, proxy, metric; then sensitivity and pruning
        clock = StageClock()
        wb = compose.prepare(cfg, clock)
        with clock.stage("sensitivity"):
            table, space = compose.prune(
                wb, plan.pruning, plan.sensitivity_samples, plan.share_groups, plan.expert_genes, plan.sensitivity_widths, plan.shrink_table
            )
        space_fp = space.fingerprint(wb.lm.fingerprint)
        if plan.finalize is not None:
            plan.finalize.check_reachable(space)  # after pruning: the smallest configuration may have grown
        sens = {**table.to_dict(), "threshold": plan.pruning.threshold, "score": plan.pruning.score, "keep_top": plan.pruning.keep_top, "pruned": space.pruned}
        start = session.start_search(space_fp, plan.seed, sens)

        # ---- the search, checkpointed after every iteration
        archive = compose.load_archive(space, session.outputs.archive_path, wb.metric.name)
        rows = session.outputs.read_metrics(start - 1)
        if session.resuming and start > plan.settings.iterations:
            log.info("resuming %s: its search is complete (%d archived configurations); what is left is the finalize stage", session.dir, len(archive))
        elif session.resuming:
            log.info("resuming %s at iteration %d with %d archived configurations", session.dir, start, len(archive))
        title = f"{wb.lm.name}: {wb.metric.name} vs bits ({plan.predictor_name}, seed {plan.seed})"
        observer = IterationObserver(session.outputs, rows, wb.metric.name, title, space_fp, plan.seed, plan.tracker, wb.targets, plan.plot_every_s)
        search = compose.assemble_search(plan, wb, table, space, archive, [observer], stop.deferred, deadline)
        objects = SearchRun(plan, wb, table, space, archive, search, session.dir, clock, observer)
        return _search_and_finalize(cfg, config, objects, session, rows, start, title, started), objects


def _search_and_finalize(cfg: DictConfig, config: dict, o: SearchRun, session: RunSession, rows: list[dict], start: int, title: str, started: float) -> dict:
    """The search from iteration `start`, the front and summary.json, then the finalize stage, with
    the tracker open throughout (closed as failed if anything raises)."""
    plan, wb, search, archive = o.plan, o.workbench, o.search, o.archive
    plan.tracker.start(str(session.dir), config, name=session.dir.name)
    failed = True
    try:
        t_search = time.perf_counter()
        with o.clock.stage("search"):
            search.run(start)
        search_s = time.perf_counter() - t_search
        if search.stopped:
            session.log_time_limit_stop(search.stopped, plan.max_minutes)
        confirmation = None
        if plan.confirm.enabled and not search.stopped:
            with o.clock.stage("confirm"):
                confirmation = compose.confirm(cfg, plan, wb, o.space, archive, session.dir, search.evaluation_guard)
            plan.tracker.log(confirmation_values(confirmation[0], wb.metric.name), step=plan.settings.iterations)
        front = session.outputs.write_front(archive, wb.metric.name, title, wb.targets)
        o.observer.finish(front)
        summary = search_summary(plan, wb, o.table, o.space, archive, rows, front, search.stopped, search_s, time.monotonic() - started, confirmation)
        summary["stages"] = o.clock.stages
        session.write_summary({**summary, FINALIZE_PENDING: True} if plan.finalize is not None else summary)  # unfinished until it ends
        if plan.finalize is not None:
            wb.bank.release()
            with o.clock.stage("finalize"):
                report = compose.run_finalize(cfg, wb, session.dir, wb.metric.name, o.space.bit_choices, keep_finished=session.resuming)
            summary["finalize"] = finalize_summary(report)
            summary["stages"] = o.clock.stages
            session.write_summary(summary)
        plan.tracker.summary(summary_values(summary))
        plan.tracker.log_artifacts(artifact_paths(session.dir))
        failed = False
    finally:
        plan.tracker.finish(failed=failed)
    evals = summary["evaluations"]
    if evals["reused_from_cache"]:
        log.info("evaluation cache: reused %d of %d evaluations", evals["reused_from_cache"], evals["archived"])
    log.info("front: %d configurations in %s (front.json, front.csv, front.png)", len(front), session.dir)
    if models := (summary.get("finalize") or {}).get("models"):
        gguf = any((session.dir / "models" / t / "llama_cpp_tensor_types.txt").is_file() for t in models)  # llama.cpp names its linears
        log.info(
            "models: %s under %s (each README.md says how to load and serve it%s)",
            ", ".join(f"{t} bits" for t in models), session.dir / "models",
            f"; amq-export {session.dir} --format gguf writes llama.cpp files and measures them" if gguf else "",
        )  # fmt: skip
    return summary


@hydra.main(version_base="1.3", config_path=compose.CONF_DIR, config_name="train_search")
def main(cfg: DictConfig) -> float:
    try:
        summary, _ = run(cfg)
        return float(summary["final_hypervolume"])
    except (ConfigError, ResourceError) as exc:
        log.error("%s", exc)
        sys.exit(exc.exit_code)
    except Interrupted as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
