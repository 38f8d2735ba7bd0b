"""What a llama.cpp run starts from: amq's bit configurations, the unquantized model and the text.

A run directory (`outputs/search/runs/<time>`) or one model directory under it names the bit
configurations (`models/<target>/bit_config.json`); the run's own settings (its config.yaml and
Hydra overrides) name the model and the data, loaded through amq's composition root exactly as
the search loaded them, so the GGUF is converted from the same checkpoint the search quantized
(the embedded models' cached safetensors) and the importance matrix and perplexity read the same
calibration and held-out splits.
"""

from __future__ import annotations

import gc
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from amq.bits import BitConfig
from amq.data.corpora import TextSplits
from amq.errors import ConfigError
from amq.llamacpp import gguf_plan
from amq.quantizers.export import BITCONFIG_FILE, read_bit_config
from amq.run.outputs import ARCHIVE_FILE, CONFIG_FILE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """One of amq's bit configurations: its label (the budget directory's name) and where it came from."""

    label: str
    config: BitConfig
    source: Path


@dataclass
class Inputs:
    """The unquantized model as a local checkpoint directory, its family, and the text splits."""

    plans: list[Plan]
    model_dir: Path
    model_type: str
    model_name: str
    splits: TextSplits
    run_dir: Path | None


def _run_dir_of(path: Path) -> Path | None:
    """The search run a path belongs to: itself or its nearest ancestor holding config.yaml and the archive."""
    for d in (path, *path.parents):
        if (d / CONFIG_FILE).is_file() and (d / ARCHIVE_FILE).is_file():
            return d
    return None


def read_plans(path: Path) -> list[Plan]:
    """The bit configurations under `path`: a model directory, or every `models/<target>/` of a run."""
    valid = "a run directory (outputs/search/runs/<time>, with models/<target>/bit_config.json) or one model directory"
    if not path.is_dir():
        raise ConfigError("path", f"{path} is not a directory", valid)
    dirs = [path] if (path / BITCONFIG_FILE).is_file() else sorted((d for d in (path / "models").glob("*") if (d / BITCONFIG_FILE).is_file()), key=_target_key)
    if not dirs:
        raise ConfigError("path", f"{path} holds no {BITCONFIG_FILE} (neither itself nor under models/)", valid)
    plans = []
    for d in dirs:
        try:
            plans.append(Plan(d.name, read_bit_config(d), d))
        except (ValueError, KeyError) as exc:
            raise ConfigError("path", f"{d / BITCONFIG_FILE} is not an amq bit configuration ({exc})", "a file written by amq finalize") from None
    return plans


def check_plans(path: Path) -> list[Plan]:
    """The plans under `path`, after refusing, before loading or building anything, bit configurations
    llama.cpp cannot hold and models it names otherwise (each amq model directory keeps the model's config.json)."""
    plans = read_plans(path)
    for p in plans:
        config = p.source / "config.json"
        model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
        try:
            if model_type is not None:
                gguf_plan.architecture(model_type)
            gguf_plan.plan(p.config)
        except ConfigError as exc:
            setting = {"model_type": "model", "bit_config": "path"}.get(exc.setting, exc.setting)  # bits: a width in bit_config.json
            raise ConfigError(setting, f"{p.source / 'bit_config.json' if setting != 'model' else p.source}: {exc.problem}", exc.valid) from None
    return plans


def require_architecture(inputs: "Inputs") -> str:
    """llama.cpp's name for the loaded model's family, or a ConfigError naming the model."""
    try:
        return gguf_plan.architecture(inputs.model_type)
    except ConfigError as exc:
        raise ConfigError("model", f"{inputs.model_name}: {exc.problem}", exc.valid) from None


def _target_key(d: Path) -> tuple[float, str]:
    try:
        return float(d.name), d.name
    except ValueError:
        return float("inf"), d.name


def _model_overrides(model: str) -> list[str]:
    """`--model`: a conf/model option (smollm2, gemma3_270m) or a local checkpoint directory."""
    local = Path(model).expanduser()
    if local.is_dir():
        return ["model=hf", f"model.source.name_or_path={local.resolve()}"]
    return [f"model={model}"]


def checkpoint_dir(model: object, hub_cache: Path | None = None) -> Path | None:
    """The directory on disk a loaded model's files are in: its own local directory, or for a hub id
    the Hugging Face cache's snapshot of the commit it was loaded at (the search downloaded it
    there); None when neither holds a config.json."""
    path = Path(str(getattr(model, "name_or_path", "")))
    if (path / "config.json").is_file():
        return path
    commit = getattr(getattr(model, "config", None), "_commit_hash", None)
    if not str(path) or path.is_absolute() or commit is None:
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(str(path), revision=commit, cache_dir=hub_cache, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        return None
    return snapshot if (snapshot / "config.json").is_file() else None


def load_inputs(path: Path, model: str | None = None) -> Inputs:
    """Plans from `path`; model and data from its run's settings (or `--model` with the default data)."""
    from amq.cli.finalize import compose_for_run
    from amq.config.compose import compose_config, load_model_and_data

    plans = read_plans(path)
    run_dir = _run_dir_of(path.resolve())
    if model is not None:
        cfg = compose_config([*_model_overrides(model), "logger=none"])
    elif run_dir is not None:
        cfg = compose_for_run(run_dir, [])
    else:
        raise ConfigError(
            "--model",
            f"{path} is not inside an amq run directory, so it does not say which model it quantizes",
            "--model smollm2 | gemma3_270m | <checkpoint dir>",
        )
    md = load_model_and_data(cfg)
    model_dir = checkpoint_dir(md.lm.model)
    model_type = str(getattr(md.lm.model.config, "model_type", ""))
    name = md.lm.name
    md.lm.model = None  # the tools read the checkpoint from disk; free the torch copy now
    gc.collect()
    if model_dir is None:
        raise ConfigError(
            "model",
            f"{name} was not loaded from a checkpoint directory on this machine",
            "an embedded model, a local directory, or a hub model in the Hugging Face cache (llama.cpp converts from files)",
        )
    log.info("model %s (%s) from %s; %d bit configuration(s): %s", name, model_type, model_dir, len(plans), ", ".join(p.label for p in plans))
    return Inputs(plans, model_dir, model_type, name, md.splits, run_dir)
