"""Trackers of the commands that follow a search: `amq-finalize` and `amq-evaluate`.

Each logs as a run of its own in the search's W&B group (amq.tracking.run_identity.tracking_group)
with its own `job_type`, so a search and everything done with its results sit together on the
dashboard. The logger settings are the search's, as its config.yaml recorded them (project, entity,
mode; `logger=none` logs nothing), unless the command names its own (amq-finalize's `logger=...`
overrides). WANDB_MODE, when set, chooses the recorded logger's mode, as it did for the search
(conf/logger/wandb.yaml: `mode: ${oc.env:WANDB_MODE,offline}`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from amq.run.outputs import ARCHIVE_FILE, CONFIG_FILE
from amq.tracking.base import MetricLogger
from amq.tracking.null_logger import NullLogger
from amq.tracking.run_identity import tracking_group

SEARCH_PARENTS = 4  # <run>/finalized/<time>/models/<target>: a search run lies at most this far up


def search_run_of(path: str | Path) -> Path | None:
    """The search run directory that `path` belongs to (the run itself, a model directory under its
    models/, or a finalized/<time>/ directory and its models), or None (a model copied elsewhere)."""
    path = Path(path).absolute()
    for p in [path, *path.parents][: SEARCH_PARENTS + 1]:
        if (p / CONFIG_FILE).is_file() and (p / ARCHIVE_FILE).is_file():
            return p
    return None


def recorded_config(search_dir: Path) -> DictConfig:
    """The search's settings as its config.yaml recorded them (resolved when it ran)."""
    return OmegaConf.load(Path(search_dir) / CONFIG_FILE)


def stage_config(search_dir: Path, **stage: Any) -> dict[str, Any]:
    """The config a stage's tracker run shows: the search's recorded settings, with `stage` entries
    (e.g. the finalize settings it ran with) replacing or adding top-level keys."""
    out = OmegaConf.to_container(recorded_config(search_dir), resolve=True)
    out.update(stage)
    return out


def stage_logger(search_dir: Path, job_type: str, node: DictConfig | None = None, tags: Sequence[str] = ()) -> MetricLogger:
    """The tracker of a stage (`job_type`: finalize, evaluate) of the search in `search_dir`: `node`
    (a logger config from the command line) or else the search's recorded logger, in the search's
    group, named after the search with the stage appended, tagged with the search's tags and `tags`.

    Identity settings are passed only to a logger config that declares them (conf/logger/wandb.yaml
    does, conf/logger/none.yaml does not). Bad settings raise ConfigError naming `logger.<key>`."""
    from amq.config.compose import build

    recorded = recorded_config(search_dir).get("logger")
    chosen = node if node is not None else recorded
    if chosen is None:
        return NullLogger()
    recorded = recorded if recorded is not None else OmegaConf.create({})
    identity: dict[str, Any] = {
        "job_type": job_type,
        "group": tracking_group(recorded.get("group"), search_dir),
        "name": f"{recorded.get('name') or Path(search_dir).name}/{job_type}",
        "tags": [*(recorded.get("tags") or []), *tags],
    }
    if node is None and os.environ.get("WANDB_MODE"):
        identity["mode"] = os.environ["WANDB_MODE"]
    return build(chosen, "logger", **{k: v for k, v in identity.items() if k in chosen})
