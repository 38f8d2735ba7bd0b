"""`amq-finalize RUN_DIR [OVERRIDES ...]`: the finalize stage again, on a finished search.

Exports and evaluates models from a run's archive with other budgets, another final quantizer or
another evaluation protocol, without searching again: e.g.

    amq-finalize outputs/search/runs/<time> finalizer=gptq finalize.targets=[3.75,4.25]

OVERRIDES are Hydra overrides of the finalize stage only (`finalize.*`, `finalizer=`,
`finalizer.*`, `num_threads`) and of its tracking (`logger=`, `logger.*`); everything else comes
from the run's own command line, and the composed settings must still match the run's
`config.yaml`. Results go to a new directory, `<run>/finalized/<time>/` (models/<target>/,
evaluation.json, evaluation.md, config.yaml), so the models the search exported are never replaced;
`amq-evaluate` accepts that directory too.

With the run's logger (or `logger=wandb`), the stage is a W&B run of its own in the search's group
(job type `finalize`): the evaluation table, perplexity against bits, and a `model` artifact per
exported model (amq/tracking/). Its files go to `<run>/finalized/<time>/wandb/`.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from amq.config.check import check_settings
from amq.config.compose import CONF_DIR
from amq.errors import ConfigError
from amq.io import atomic_write_text
from amq.run.outputs import ARCHIVE_FILE, CONFIG_FILE, SUMMARY_FILE
from amq.run.resume import comparable_settings, differences, shown_differences, task_overrides, under
from amq.tracking.base import MetricLogger
from amq.tracking.report import final_values
from amq.tracking.stages import stage_config, stage_logger

log = logging.getLogger("amq.finalize")
FINALIZE_KEYS = ("finalize", "finalizer", "num_threads", "logger")
VALID_OVERRIDES = "finalize.<key>=..., finalizer=hqq|gptq|awq, finalizer.<key>=..., num_threads=N, logger=wandb|none, logger.<key>=..."
JOB_TYPE = "finalize"  # the W&B job type of the stage's run (the search's is `search`)


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0].strip()


def _is_finalize_key(key: str) -> bool:
    return under(key, FINALIZE_KEYS)


def check_finished(run_dir: Path) -> None:
    """A run directory whose search ended: its settings, its archive and its summary are there."""
    valid = "the directory of a finished amq-search run (outputs/search/runs/<time>)"
    if not run_dir.is_dir():
        raise ConfigError("run_dir", f"{run_dir} is not a directory", valid)
    for name in (CONFIG_FILE, ARCHIVE_FILE):
        if not (run_dir / name).is_file():
            raise ConfigError("run_dir", f"{run_dir} holds no {name}", valid)
    if not (run_dir / SUMMARY_FILE).is_file():
        raise ConfigError("run_dir", f"{run_dir} has not finished its search (no {SUMMARY_FILE})", f"finish it first: amq-search resume={run_dir}")


def compose_for_run(run_dir: Path, overrides: Sequence[str]) -> DictConfig:
    """The run's own settings with the finalize overrides applied, checked against its config.yaml."""
    from hydra import compose, initialize_config_dir

    bad = [o for o in overrides if not _is_finalize_key(_key(o))]
    if bad:
        raise ConfigError("overrides", f"{', '.join(map(repr, bad))} would change the search, not its finalization", VALID_OVERRIDES)
    mine = {_key(o) for o in overrides}
    kept = [o for o in (task_overrides(run_dir) or []) if _key(o) not in mine]
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="train_search", overrides=[*kept, *overrides, "finalize.enabled=true"])
    except HydraException as exc:
        raise ConfigError("overrides", str(exc).strip().splitlines()[0], VALID_OVERRIDES) from None
    check_settings(cfg, CONF_DIR)
    search_only = lambda settings: {k: v for k, v in settings.items() if not _is_finalize_key(k)}  # noqa: E731
    diff = differences(search_only(comparable_settings(OmegaConf.load(run_dir / CONFIG_FILE))), search_only(comparable_settings(cfg)))
    if diff:
        raise ConfigError(
            "run_dir",
            f"the configuration files no longer give {run_dir}'s settings: {shown_differences(diff)}",
            "a run made with the current conf/, or the amq version that made it",
        )
    return cfg


def stage_tracker(run_dir: Path, cfg: DictConfig, overrides: Sequence[str]) -> MetricLogger:
    """The stage's tracker: the run's recorded logger, or the one the overrides compose (`logger=...`)."""
    node = cfg.logger if any(under(_key(o), ("logger",)) for o in overrides) else None
    return stage_logger(run_dir, JOB_TYPE, node, tags=[o for o in overrides if not under(_key(o), ("logger",))])


def finalize_run(run_dir: Path, overrides: Sequence[str]) -> Path:
    """Run the finalize stage on `run_dir` into a new `finalized/<time>/` directory; returns it."""
    from amq.config.compose import check_finalize_components, finalize_settings, load_model_and_data, run_finalize
    from amq.finalize.selection import archive_metric, read_candidates, select_for_targets
    from amq.run.summary import finalize_summary

    check_finished(run_dir)
    cfg = compose_for_run(run_dir, overrides)
    settings = finalize_settings(cfg.finalize)
    check_finalize_components(cfg)
    metric = archive_metric(run_dir / ARCHIVE_FILE)
    select_for_targets(read_candidates(run_dir / ARCHIVE_FILE, metric), settings.targets, settings.bits_convention)  # unreachable budgets fail now
    tracker = stage_tracker(run_dir, cfg, overrides)  # bad logger settings fail before the work
    out_dir = run_dir / "finalized" / time.strftime("%Y-%m-%d_%H-%M-%S")
    if out_dir.exists():
        raise ConfigError("run_dir", f"{out_dir} already exists", "wait a second and run again")
    md = load_model_and_data(cfg)
    record = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("finalize", "finalizer")}
    out_dir.mkdir(parents=True)
    failed = True
    try:
        atomic_write_text(out_dir / CONFIG_FILE, OmegaConf.to_yaml(OmegaConf.create({**record, "overrides": list(overrides)})))
        tracker.start(
            str(out_dir),
            stage_config(run_dir, **record, stage={"job_type": JOB_TYPE, "run_dir": str(run_dir), "overrides": list(overrides)}),
            name=out_dir.name,
        )
        report = run_finalize(cfg, md, run_dir, metric, [int(b) for b in cfg.search.bits], out_dir)
        tracker.summary(final_values(finalize_summary(report)))
        tracker.log_finalize(out_dir)
        failed = False
    finally:
        tracker.finish(failed=failed)  # a failed stage's run is closed as failed
        if failed and not any((out_dir / "models").glob("*")):  # keep models already exported (each written atomically)
            shutil.rmtree(out_dir, ignore_errors=True)
    return out_dir


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="amq-finalize", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("run_dir", type=Path, help="a finished amq-search run directory")
    ap.add_argument("overrides", nargs="*", help=f"finalize overrides: {VALID_OVERRIDES}")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s", stream=sys.stderr)
    try:
        out_dir = finalize_run(args.run_dir, args.overrides)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    log.info("finalized %s into %s (evaluation.md, models/)", args.run_dir, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
