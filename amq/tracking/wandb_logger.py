"""Weights & Biases logging. Offline by default: runs land under the run directory and can be
synced later with `wandb sync`; set mode=online (with WANDB_API_KEY or `wandb login`) to stream.

What a run shows: the resolved config; per iteration the metrics row of metrics.jsonl (iteration
as step); every `front_every` iterations the front as a table and front.png as an image; at the
end summary values and the result files as one artifact. In a multirun the group, name and tags
come from conf/logger/wandb.yaml (the sweep, the overridden settings), so runs line up.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from amq.errors import ConfigError

log = logging.getLogger(__name__)

MODES = ("offline", "online", "disabled")
MAX_TAG_LEN = 64  # W&B rejects longer tags


class WandbLogger:
    def __init__(
        self,
        project: str = "amq",
        mode: str | None = None,
        entity: str | None = None,
        group: str | None = None,
        name: str | None = None,
        tags: Sequence[str] | None = None,
        job_type: str = "search",
        front_every: int = 1,
    ) -> None:
        mode = mode or os.environ.get("WANDB_MODE") or "offline"
        if mode not in MODES:
            raise ConfigError("logger.mode", f"{mode!r}", ", ".join(MODES))
        if mode == "online" and not (os.environ.get("WANDB_API_KEY") or _has_netrc_key()):
            raise ConfigError("logger.mode", "online needs a W&B API key (WANDB_API_KEY or `wandb login`)", "offline, disabled, or online with a key")
        if int(front_every) < 0:
            raise ConfigError("logger.front_every", f"{front_every}", "0 (only the final front) or every k >= 1 iterations")
        self.project, self.mode, self.entity, self.job_type = project, mode, entity, job_type
        self.group = group or None
        self.name = name or None
        self.tags = _clean_tags(tags)
        self.front_every = int(front_every)
        self._run = None
        self._last_front: tuple[list[dict[str, Any]], str, Path | None, int] | None = None

    def start(self, run_dir: str, config: dict[str, Any], name: str) -> None:
        import wandb

        if isinstance(config, (DictConfig, ListConfig)):
            config = OmegaConf.to_container(config, resolve=True)
        # Keep everything W&B writes inside <run_dir>/wandb/, not in ~/.cache, ~/.config, ...
        wdir = Path(run_dir)
        for var, sub in (("WANDB_DIR", ""), ("WANDB_CACHE_DIR", "wandb/.cache"), ("WANDB_DATA_DIR", "wandb/.data"), ("WANDB_CONFIG_DIR", "wandb/.config")):
            os.environ[var] = str(wdir / sub)
        self._run = wandb.init(
            project=self.project,
            entity=self.entity,
            group=self.group,
            tags=self.tags,
            name=self.name or name,
            job_type=self.job_type,
            config=config,
            dir=str(wdir),
            mode=self.mode,
            reinit="finish_previous",
        )
        log.info("W&B run %s (%s, group %s) in %s", self._run.name, self.mode, self.group or "-", wdir / "wandb")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self._run is not None:
            self._run.log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def log_front(self, front: list[dict[str, Any]], metric_name: str, image: Path | None, step: int) -> None:
        if self._run is None:
            return
        self._last_front = (front, metric_name, image, step)
        if self.front_every and step % self.front_every == 0:
            self._run.log(self._front_payload(front, metric_name, image), step=step)

    def _front_payload(self, front: list[dict[str, Any]], metric_name: str, image: Path | None) -> dict[str, Any]:
        import wandb

        columns = ["avg_bits", "avg_bits_weights_only", metric_name, "iteration", "genes"]
        table = wandb.Table(
            columns=columns, data=[[r["avg_bits"], r["avg_bits_weights_only"], r[metric_name], r["iteration"], "".join(map(str, r["genes"]))] for r in front]
        )
        payload: dict[str, Any] = {"front/table": table, "front/size": len(front)}
        if image is not None and Path(image).is_file():
            payload["front/plot"] = wandb.Image(str(image))
        return payload

    def summary(self, values: dict[str, Any]) -> None:
        if self._run is None:
            return
        for k, v in values.items():
            self._run.summary[k] = v
        if self._last_front is not None:  # the final front, whatever front_every skipped
            import wandb

            front, metric_name, image, step = self._last_front
            payload = self._front_payload(front, metric_name, image)
            payload = {k.replace("front/", "final_front/", 1): v for k, v in payload.items()}
            payload["final_front/scatter"] = wandb.plot.scatter(
                payload["final_front/table"], "avg_bits", metric_name, title=f"final front: {metric_name} vs average bits"
            )
            self._run.log(payload, step=step)

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        if self._run is None or not paths:
            return
        import wandb

        art = wandb.Artifact(f"search-{self._run.id}", type="amq-search", description="archive, front, sensitivity table and summary of one search")
        for p in paths:
            art.add_file(str(p), name=Path(p).name)
        self._run.log_artifact(art)

    def finish(self, failed: bool = False) -> None:
        if self._run is not None:
            try:
                self._run.finish(exit_code=1 if failed else 0)
            finally:
                self._run = None
                self._last_front = None


def _clean_tags(tags: Sequence[str] | None) -> list[str]:
    """Overrides make good tags (`predictor=mlp`); W&B wants them short and non-empty."""
    out: list[str] = []
    for t in tags or []:
        t = re.sub(r"\s+", "", str(t))[:MAX_TAG_LEN]
        if t and t not in out:
            out.append(t)
    return out


def _has_netrc_key() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")
