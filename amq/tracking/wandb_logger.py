"""Weights & Biases logging. Offline by default: runs land under the run directory and can be
synced later with `wandb sync`; set mode=online (with WANDB_API_KEY or `wandb login`) to stream.

What a search run shows: the resolved config; per iteration the metrics row of metrics.jsonl
(iteration as step); every `front_every` iterations the front as a table and front.png as an image;
at the end summary values and the result files as one artifact. In a multirun the group, name and
tags come from conf/logger/wandb.yaml (the sweep, the overridden settings), so runs line up; a
single run is a group of its own, named after its run directory.

The finalize stage (the search's own, `amq-finalize`) adds its evaluation table, held-out
perplexity against bits next to the uniform baselines, and one artifact of type `model` per exported
model directory; `amq-evaluate` adds a table of the re-measured models. Those later commands log
as runs of their own in the search's group (amq/tracking/stages.py), told apart by `job_type`.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from amq.errors import ConfigError
from amq.tracking.report import (
    MODEL_CARD,
    evaluation_table,
    exported_models,
    model_artifact_name,
    model_metadata,
    perplexity_series,
    read_report,
    reevaluation_table,
)
from amq.tracking.run_identity import tracking_group

log = logging.getLogger(__name__)

MODES = ("offline", "online", "disabled")
# How an exported model directory goes into its `model` artifact: upload (its files, synced with the
# run), reference (file:// references with checksums: nothing uploaded, for storage the W&B server's
# users share; the model card and small files are still uploaded), none (no model artifacts).
MODEL_FILES = ("upload", "reference", "none")
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin")  # the large files; written once, never changed in place
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
        model_files: str = "upload",
    ) -> None:
        mode = mode or os.environ.get("WANDB_MODE") or "offline"
        if mode not in MODES:
            raise ConfigError("logger.mode", f"{mode!r}", ", ".join(MODES))
        if mode == "online" and not (os.environ.get("WANDB_API_KEY") or _has_netrc_key()):
            raise ConfigError("logger.mode", "online needs a W&B API key (WANDB_API_KEY or `wandb login`)", "offline, disabled, or online with a key")
        if int(front_every) < 0:
            raise ConfigError("logger.front_every", f"{front_every}", "0 (only the final front) or every k >= 1 iterations")
        if model_files not in MODEL_FILES:
            raise ConfigError("logger.model_files", f"{model_files!r}", ", ".join(MODEL_FILES))
        self.project, self.mode, self.entity, self.job_type = project, mode, entity, job_type
        self.model_files = model_files
        self.group = group or None
        self.name = name or None
        self.tags = _clean_tags(tags)
        self.front_every = int(front_every)
        self._run = None
        self._last_front: tuple[list[dict[str, Any]], str, Path | None, int] | None = None

    def start(self, run_dir: str, config: dict[str, Any], name: str) -> None:
        """Open the run, its files under `<run_dir>/wandb/`; without a configured group (a single
        run), the run directory's name is the group, which the later stages of the search join."""
        import wandb

        if isinstance(config, (DictConfig, ListConfig)):
            config = OmegaConf.to_container(config, resolve=True)
        # Keep everything W&B writes inside <run_dir>/wandb/, not in ~/.cache, ~/.config, ...
        wdir = Path(run_dir)
        for var, sub in (("WANDB_DIR", ""), ("WANDB_CACHE_DIR", "wandb/.cache"), ("WANDB_DATA_DIR", "wandb/.data"), ("WANDB_CONFIG_DIR", "wandb/.config")):
            os.environ[var] = str(wdir / sub)
        self.group = tracking_group(self.group, wdir)
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
        log.info("W&B run %s (%s, %s, group %s) in %s", self._run.name, self.job_type, self.mode, self.group, wdir / "wandb")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self._run is not None:
            self._run.log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def log_image(self, key: str, image: Path, step: int) -> None:
        if self._run is not None and Path(image).is_file():
            import wandb

            self._run.log({key: wandb.Image(str(image))}, step=step)

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
        """The run's result files as one `amq-search` artifact; when the search's finalize stage
        ran (evaluation.json among them), also its evaluation and exported models (`log_finalize`)."""
        if self._run is None or not paths:
            return
        import wandb

        art = wandb.Artifact(f"search-{self._run.id}", type="amq-search", description="archive, front, sensitivity table and summary of one search")
        for p in paths:
            art.add_file(str(p), name=Path(p).name)
        self._run.log_artifact(art)
        finalized = {Path(p).parent for p in paths if Path(p).name == "evaluation.json"}
        for output_dir in sorted(finalized):
            self.log_finalize(output_dir)

    def log_finalize(self, output_dir: Path) -> None:
        """The finalize stage's results in `output_dir` (a run directory or `finalized/<time>/`): the
        evaluation rows as a table, held-out perplexity against bits per text as a chart beside the
        uniform baselines (and the stage's own PNG charts), and a `model` artifact per exported model."""
        if self._run is None:
            return
        output_dir = Path(output_dir)
        report = read_report(output_dir)
        artifacts = {} if self.model_files == "none" else {d.name: self._log_model(d, report) for d in exported_models(output_dir)}
        if report is not None:
            self._run.log(self._evaluation_payload(report, output_dir, artifacts))

    def _evaluation_payload(self, report: dict[str, Any], output_dir: Path, artifacts: dict[str, str]) -> dict[str, Any]:
        import wandb

        columns, data = evaluation_table(report, artifacts)
        table = wandb.Table(columns=columns, data=data)
        payload: dict[str, Any] = {"evaluation/table": table}
        for text in (c.split("/", 1)[1] for c in columns if c.startswith("ppl/")):
            series = perplexity_series(report, text)
            if series:
                payload[f"evaluation/ppl_vs_bits/{text}"] = wandb.plot.line_series(
                    xs=[xs for xs, _ in series.values()],
                    ys=[ys for _, ys in series.values()],
                    keys=list(series),
                    title=f"held-out perplexity ({text}) vs average bits ({report.get('bits_convention', 'with_meta')})",
                    xname="avg_bits",
                )
        for name in ("perplexity_vs_bits", "proxy_vs_perplexity"):  # amq/finalize/charts.py
            if (output_dir / f"{name}.png").is_file():
                payload[f"evaluation/{name}"] = wandb.Image(str(output_dir / f"{name}.png"))
        return payload

    def _log_model(self, model_dir: Path, report: dict[str, Any] | None) -> str:
        """One exported model directory as an artifact of type `model`; returns its name."""
        import wandb

        meta = model_metadata(model_dir, report)
        meta["run_group"] = self.group
        name = model_artifact_name(meta)
        card = model_dir / MODEL_CARD
        art = wandb.Artifact(name, type="model", description=card.read_text() if card.is_file() else None, metadata=meta)
        for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
            rel = path.relative_to(model_dir).as_posix()
            if path.suffix in WEIGHT_SUFFIXES and self.model_files == "reference":
                art.add_reference(path.absolute().as_uri(), name=rel)
            else:  # weights are written once (atomically) and never changed in place: no staging copy
                art.add_file(str(path), name=rel, policy="immutable" if path.suffix in WEIGHT_SUFFIXES else "mutable")
        self._run.log_artifact(art)
        log.info("W&B model artifact %s (%s): %s", name, self.model_files, model_dir)
        return name

    def log_evaluations(self, results: Sequence[dict[str, Any]]) -> None:
        """amq-evaluate's results (eval.json of each re-measured model) as one table, and each
        model's perplexities and accuracies in the summary (`eval/ppl_<text>@<model dir name>`)."""
        if self._run is None or not results:
            return
        import wandb

        columns, data = reevaluation_table(results)
        self._run.log({"evaluation/table": wandb.Table(columns=columns, data=data)})
        for r in results:
            label = Path(r["model_dir"]).name
            for text, v in (r.get("perplexity") or {}).items():
                self._run.summary[f"eval/ppl_{text}@{label}"] = v["perplexity"]
            for task, v in (r.get("zero_shot") or {}).items():
                if v.get("acc") is not None:
                    self._run.summary[f"eval/acc_{task}@{label}"] = v["acc"]

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
