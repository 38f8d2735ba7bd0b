"""Weights & Biases logging. Offline by default: runs land under the run directory and can be
synced later with `wandb sync`; set mode=online (with WANDB_API_KEY or `wandb login`) to stream."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from amq.errors import ConfigError

log = logging.getLogger(__name__)

MODES = ("offline", "online", "disabled")


class WandbLogger:
    def __init__(self, project: str = "amq", mode: str | None = None, entity: str | None = None, group: str | None = None, tags: list[str] | None = None) -> None:
        mode = mode or os.environ.get("WANDB_MODE") or "offline"
        if mode not in MODES:
            raise ConfigError("logger.mode", f"{mode!r}", ", ".join(MODES))
        if mode == "online" and not (os.environ.get("WANDB_API_KEY") or _has_netrc_key()):
            raise ConfigError("logger.mode", "online needs a W&B API key (WANDB_API_KEY or `wandb login`)", "offline, disabled, or online with a key")
        self.project, self.mode, self.entity, self.group, self.tags = project, mode, entity, group, list(tags or [])
        self._run = None

    def start(self, run_dir: str, config: dict[str, Any], name: str) -> None:
        import wandb

        # Keep everything W&B writes inside the run directory, not in ~/.cache, ~/.config, ...
        wdir = Path(run_dir)
        for var, sub in (("WANDB_DIR", ""), ("WANDB_CACHE_DIR", "wandb-cache"), ("WANDB_DATA_DIR", "wandb-data"), ("WANDB_CONFIG_DIR", "wandb-config")):
            os.environ[var] = str(wdir / sub)
        self._run = wandb.init(
            project=self.project, entity=self.entity, group=self.group, tags=self.tags, name=name,
            config=config, dir=str(wdir), mode=self.mode, reinit="finish_previous",
        )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self._run is not None:
            self._run.log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self._run is not None:
            for k, v in values.items():
                self._run.summary[k] = v

    def finish(self, failed: bool = False) -> None:
        if self._run is not None:
            self._run.finish(exit_code=1 if failed else 0)
            self._run = None


def _has_netrc_key() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")
