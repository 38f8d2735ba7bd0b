"""Composition root: turns a composed config into the objects the stages work on.

`prepare()` does what every consumer of a search space needs (the search entrypoint and the
benchmark scripts alike): load the model, discover its linears, read and tokenise the data,
build the proxy bank and the metric. `prune()` runs the sensitivity stage and returns the space.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from amq import sensitivity
from amq.data.corpora import TextSplits
from amq.data.tokens import CalibrationSpec, calibration_windows
from amq.errors import ConfigError
from amq.metrics.base import QualityMetric
from amq.modeling.discovery import ModelLayout, discover_layout
from amq.modeling.loading import LoadedModel
from amq.proxy.bank import ProxyBank
from amq.search.evaluator import ProxyEvaluator
from amq.search.space import SearchSpace

log = logging.getLogger(__name__)


def build(node: DictConfig, setting: str, **kwargs: Any) -> Any:
    """instantiate() with bad settings turned into a one-line ConfigError naming the group."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        msg = str(cause or exc).splitlines()[0]
        raise ConfigError(setting, msg, f"the keys documented in conf/{setting}/") from None


def quiet_libraries() -> None:
    """Keep the run log about the search: silence per-tensor progress bars and chatty loggers."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    for name in ("gensim", "smart_open", "wandb"):
        logging.getLogger(name).setLevel(logging.WARNING)


def tokens_hash(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.numpy().tobytes()).hexdigest()[:16]


def code_hash(*objects: Any) -> str:
    """Hash of the source files defining `objects`: a cached value computed by other code is not reused."""
    h = hashlib.sha256()
    for path in sorted({inspect.getsourcefile(o) for o in objects}):
        h.update(Path(path).read_bytes())
    return h.hexdigest()[:16]


def evaluation_context(wb: "Workbench") -> dict:
    """What a true evaluation's value depends on besides the configuration (the evaluation cache key)."""
    import transformers

    return {
        "model": wb.lm.fingerprint,
        "dtype": str(wb.lm.model.dtype),
        "device": wb.lm.device.type,
        "quantizer": wb.bank.quantizer.settings(),
        "metric": wb.metric.settings(),
        "tokens": tokens_hash(wb.metric.tokens),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "code": code_hash(type(wb.metric), type(wb.bank.quantizer), ProxyBank, ProxyEvaluator),
    }


@dataclass
class Workbench:
    """Everything a true evaluation needs: the model, its layout, data, proxy bank and metric."""

    lm: LoadedModel
    layout: ModelLayout
    splits: TextSplits
    tokens: torch.Tensor
    bank: ProxyBank
    metric: QualityMetric
    bits: list[int]
    targets: list[float]
    cache_dir: Path


def prepare(cfg: DictConfig) -> Workbench:
    """Model, layout, data, proxy and metric, with every setting checked before the expensive work."""
    quiet_libraries()
    torch.manual_seed(int(cfg.seed))
    if cfg.num_threads is not None:
        if int(cfg.num_threads) < 1:
            raise ConfigError("num_threads", f"{cfg.num_threads}", "an integer >= 1, or null (torch's default)")
        torch.set_num_threads(int(cfg.num_threads))
    cache_dir = Path(cfg.paths.cache_dir)
    source = build(cfg.model.source, "model")
    quantizer = build(cfg.quantizer, "quantizer")
    corpus = build(cfg.data, "data")
    calib = CalibrationSpec(int(cfg.budget.n_samples), int(cfg.budget.seq_len), seed=int(cfg.data_seed))
    bits = [int(b) for b in cfg.search.bits]

    lm = source.load(cache_dir)
    layout = discover_layout(lm.model)
    quantizer.validate(bits, layout.linears)
    targets = SearchSpace(layout.linears, bits, quantizer.group_size).check_targets(cfg.search.targets)
    log.info("model %s: %d decoder blocks (%s), %d linears", lm.name, layout.n_blocks, layout.blocks_name, len(layout.linears))
    splits = corpus.load()
    tokens = calibration_windows(lm.tokenizer, splits.calibration, calib, lm.add_bos)

    # the metric's reference distributions come from the unquantized model, before the bank swaps anything
    metric = build(cfg.metric, "metric", _partial_=False, model=lm.model, tokens=tokens)
    bank = ProxyBank(lm.model, layout, quantizer, bits, storage=quantizer.storage).build(cache_dir / "proxy", lm.fingerprint)
    return Workbench(lm, layout, splits, tokens, bank, metric, bits, targets, cache_dir)


def prune(wb: Workbench, pruning: sensitivity.Pruning, sensitivity_samples: int, share_groups) -> tuple[sensitivity.SensitivityTable, SearchSpace]:
    """Stage: sensitivity (cached) and pruning; returns the table and the pruned search space."""
    sens_metric = wb.metric.subset(sensitivity_samples)
    table = sensitivity.cached_measure(
        wb.bank, sens_metric, wb.cache_dir / "sensitivity", wb.lm.fingerprint,
        {"metric": sens_metric.description, "tokens": tokens_hash(sens_metric.tokens), "code": code_hash(type(sens_metric), type(wb.bank.quantizer), ProxyBank, sensitivity.measure)},
    )
    space = SearchSpace(wb.layout.linears, wb.bits, wb.bank.quantizer.group_size, pruning.pruned(table), share_groups, pruning.keep_top)
    log.info(
        "pruning: %d of %d linears limited to the top %d width(s) %s (threshold %.2f x median); %d genes, %.3f-%.3f bits",
        len(space.pruned), len(wb.layout.linears), pruning.keep_top, wb.bits[-pruning.keep_top:], pruning.threshold, space.n_genes, *space.bits_range(),
    )
    lo, _ = space.bits_range()
    for t in wb.targets:
        if t < lo:
            log.warning("target %.3g bits is below the pruned space's minimum %.3f: nothing will be reported there", t, lo)
    return table, space
