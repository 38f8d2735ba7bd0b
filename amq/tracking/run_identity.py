"""Where a run sits in a sweep, for the tracker: its W&B group, name and tags.

Registered as an OmegaConf resolver so that conf/logger/wandb.yaml can say
`group: ${amq_sweep_group:}` next to `name: ${hydra:job.override_dirname}`; the resolved values
land in config.yaml too, so a run directory records how it was labelled.
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


OmegaConf.register_new_resolver("amq_sweep_group", sweep_group, replace=True)
