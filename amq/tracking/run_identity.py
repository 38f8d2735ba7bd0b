"""Where a run sits in a sweep, for the tracker: its W&B group, name and tags.

Registered as OmegaConf resolvers so that conf/logger/wandb.yaml can say
`group: ${amq_sweep_group:}`, `name: ${amq_run_name:}`, `tags: ${amq_run_tags:}`; the resolved
values land in config.yaml too, so a run directory records how it was labelled. Outside a Hydra
job (the compose API, a notebook) they resolve to nothing instead of failing.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf


def sweep_group() -> str | None:
    """In a multirun, the sweep directory's name (shared by all its jobs); None for a single run.

    The sweep directory is `<time>_<sweep_name>` (conf/hydra/default.yaml), so the group reads as
    e.g. `2025-06-01_12-00-00_predictor_ablation` and two launches of one sweep stay apart.
    """
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    return Path(str(hc.sweep.dir)).name


def tracking_group(configured: str | None, search_dir: str | Path) -> str:
    """The group of a search's tracker run and of the runs of its later stages (amq-finalize,
    amq-evaluate): the configured one (a sweep's), else the search's run directory name, so that a
    single search and everything done with its results sit in one group."""
    return str(configured) if configured else Path(search_dir).name


def run_name() -> str | None:
    """The overridden settings (`hydra.job.override_dirname`, e.g. `predictor=mlp,seed=1`).

    Settings that don't change results are left out by hydra.job.config.override_dirname.exclude_keys;
    None when nothing is overridden (the logger then uses the run directory's name).
    """
    if not HydraConfig.initialized():
        return None
    return str(HydraConfig.get().job.override_dirname) or None


def run_tags() -> list[str]:
    """Every command-line override of the job (`hydra.overrides.task`), one tag each."""
    if not HydraConfig.initialized():
        return []
    return [str(o) for o in HydraConfig.get().overrides.task]


OmegaConf.register_new_resolver("amq_sweep_group", sweep_group, replace=True)
OmegaConf.register_new_resolver("amq_run_name", run_name, replace=True)
OmegaConf.register_new_resolver("amq_run_tags", run_tags, replace=True)
