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
from typing import TYPE_CHECKING, Any

import torch
import yaml
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from amq import sensitivity
from amq.data.corpora import TextSplits
from amq.data.tokens import CalibrationSpec, calibration_windows
from amq.errors import ConfigError
from amq.metrics.base import QualityMetric
from amq.modeling.discovery import ModelLayout, discover_layout
from amq.proxy.bank import ProxyBank
from amq.search.evaluator import ProxyEvaluator
from amq.search.loop import SearchSettings
from amq.search.space import SearchSpace

if TYPE_CHECKING:  # transformers is slow to import: settings errors come before it
    from amq.evaluation.suite import EvalSuite
    from amq.modeling.loading import LoadedModel
    from amq.finalize.settings import FinalizeSettings
    from amq.finalize.stage import Finalizer

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


def parse_overrides(text: str) -> dict[str, Any]:
    """`key=value,key=value` (values read as YAML) -> keyword overrides of a component's settings."""
    pairs = (kv.partition("=") for kv in text.split(",") if kv.strip())
    return {k.strip(): yaml.safe_load(v) for k, _, v in pairs}


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


def evaluation_context(wb: "Workbench", metric: QualityMetric | None = None, *code: Any) -> dict:
    """What a measured value depends on besides the configuration (the key of the evaluation and
    sensitivity caches): model, dtype, device, quantizer, metric and its tokens, library versions,
    and the code that computes it (`code`: more objects whose source files count)."""
    import transformers

    metric = metric or wb.metric
    return {
        "model": wb.lm.fingerprint,
        "dtype": str(wb.lm.model.dtype),
        "device": wb.lm.device.type,
        "quantizer": wb.bank.quantizer.settings(),
        "metric": metric.settings(),
        "tokens": tokens_hash(metric.tokens),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "code": code_hash(type(metric), type(wb.bank.quantizer), ProxyBank, ProxyEvaluator, *code),
    }


@dataclass
class ModelAndData:
    """What the finalize stage needs: the model, its layout and the run's text splits."""

    lm: LoadedModel
    layout: ModelLayout
    splits: TextSplits
    cache_dir: Path


@dataclass
class Workbench(ModelAndData):
    """Everything a true evaluation needs besides: calibration tokens, proxy bank and metric."""

    tokens: torch.Tensor
    bank: ProxyBank
    metric: QualityMetric
    bits: list[int]
    targets: list[float]


def set_threads(num_threads: Any) -> None:
    """torch's CPU threads (None: its default), refusing non-positive counts."""
    if num_threads is not None:
        if int(num_threads) < 1:
            raise ConfigError("num_threads", f"{num_threads}", "an integer >= 1, or null (torch's default)")
        torch.set_num_threads(int(num_threads))


def load_model_and_data(cfg: DictConfig) -> ModelAndData:
    """Load the model, discover its linears and read the data (no proxy, no metric)."""
    quiet_libraries()
    set_threads(cfg.num_threads)
    cache_dir = Path(cfg.paths.cache_dir)
    source, corpus = build(cfg.model.source, "model"), build(cfg.data, "data")
    if getattr(corpus, "cache_dir", "") is None:  # a corpus that caches what it parses: in the run's cache
        corpus.cache_dir = str(cache_dir)
    lm = source.load(cache_dir)
    layout = discover_layout(lm.model)
    log.info("model %s: %d decoder blocks (%s), %d linears", lm.name, layout.n_blocks, layout.blocks_name, len(layout.linears))
    return ModelAndData(lm, layout, corpus.load(), cache_dir)


def prepare(cfg: DictConfig) -> Workbench:
    """Model, layout, data, proxy and metric, with every setting checked before the expensive work."""
    torch.manual_seed(int(cfg.seed))
    quantizer = build(cfg.quantizer, "quantizer")
    calib = CalibrationSpec(int(cfg.budget.n_samples), int(cfg.budget.seq_len), seed=int(cfg.data_seed))
    bits = [int(b) for b in cfg.search.bits]

    md = load_model_and_data(cfg)
    lm, layout = md.lm, md.layout
    quantizer.validate(bits, layout.linears)
    full_space = SearchSpace(layout.linears, bits, quantizer.group_size)
    targets = full_space.check_targets(cfg.search.targets)
    if cfg.finalize.enabled:  # before the proxy and sensitivity: budgets below every configuration fail now
        finalize_settings(cfg.finalize).check_reachable(full_space)
    tokens = calibration_windows(lm.tokenizer, md.splits.calibration, calib, lm.add_bos)

    # the metric's reference distributions come from the unquantized model, before the bank swaps anything
    metric = build(cfg.metric, "metric", _partial_=False, model=lm.model, tokens=tokens)
    if hasattr(metric, "reuse_prefix"):  # passes start at the first changed block
        metric.reuse_prefix(lm.model.get_submodule(layout.blocks_name))
    bank = ProxyBank(lm.model, layout, quantizer, bits, storage=quantizer.storage).build(md.cache_dir / "proxy", lm.fingerprint)
    return Workbench(lm, layout, md.splits, md.cache_dir, tokens, bank, metric, bits, targets)


def search_settings(cfg: DictConfig) -> SearchSettings:
    """The loop's amount of work and operators, from the budget and search groups."""
    return SearchSettings(
        n_initial_random=int(cfg.budget.n_initial_random),
        iterations=int(cfg.budget.iterations),
        batch_size=int(cfg.budget.batch_size),
        nsga=build(cfg.search.nsga, "search"),
        bits_window=tuple(cfg.search.bits_window) if cfg.search.bits_window else None,
        kappa=float(cfg.search.kappa),
    )


def prune(wb: Workbench, pruning: sensitivity.Pruning, sensitivity_samples: int, share_groups) -> tuple[sensitivity.SensitivityTable, SearchSpace]:
    """Stage: sensitivity (cached) and pruning; returns the table and the pruned search space."""
    sens_metric = wb.metric.subset(sensitivity_samples)
    context = {**evaluation_context(wb, sens_metric, sensitivity.measure), "description": sens_metric.description}
    table = sensitivity.cached_measure(wb.bank, sens_metric, wb.cache_dir / "sensitivity", context)
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


def finalize_settings(node: DictConfig) -> "FinalizeSettings":
    """The finalize node as settings (checked before the search spends anything)."""
    from amq.finalize.settings import FinalizeSettings

    targets = node.targets if node.targets is not None else []
    if isinstance(targets, (int, float)):
        targets = [targets]
    try:
        values = tuple(float(t) for t in targets)
    except (TypeError, ValueError):
        raise ConfigError("finalize.targets", f"{targets!r} is not a list of numbers", "a list of average-bits budgets, e.g. [4.0, 4.5]") from None
    return FinalizeSettings(values, str(node.bits_convention), bool(node.evaluate), int(node.extra_front_points), bool(node.baselines))


def eval_suite(node: DictConfig, splits: TextSplits, add_bos: bool, cache_dir: Path) -> "EvalSuite":
    """Held-out texts of the run's data plus the finalize node's perplexity protocol and tasks."""
    from amq.evaluation.perplexity import PerplexityProtocol
    from amq.evaluation.suite import EvalSuite

    proto = PerplexityProtocol(int(node.window), None if node.max_windows is None else int(node.max_windows), add_bos)
    limit = None if node.task_limit is None else int(node.task_limit)
    return EvalSuite(dict(splits.heldout), splits.description, proto, tuple(node.tasks or ()), limit, cache_dir)


def check_finalize_components(cfg: DictConfig) -> None:
    """Build the final quantizer and ready the zero-shot tasks now, so bad settings, an unreachable
    hub or missing task files fail before the minutes of work that come before the finalize stage."""
    build(cfg.finalizer, "finalizer")
    if cfg.finalize.evaluate and cfg.finalize.tasks:
        from amq.evaluation.zeroshot import prepare_zero_shot

        prepare_zero_shot(list(cfg.finalize.tasks), cfg.paths.cache_dir)


def finalizer_for(cfg: DictConfig, wb: ModelAndData, run_dir: Path, metric_name: str, out_dir: Path | None = None) -> "Finalizer":
    """The finalize stage for a loaded model and data (calibration windows drawn from the calibration split).

    Models and reports go to `out_dir` (default: the run directory itself)."""
    from amq.finalize.stage import Finalizer

    node = cfg.finalize
    quantizer = build(cfg.finalizer, "finalizer")
    calib = None
    if quantizer.needs_calibration:
        spec = CalibrationSpec(int(node.n_samples), int(node.seq_len), seed=int(cfg.data_seed))
        calib = calibration_windows(wb.lm.tokenizer, wb.splits.calibration, spec, wb.lm.add_bos)
    suite = eval_suite(node, wb.splits, wb.lm.add_bos, wb.cache_dir) if node.evaluate else None
    return Finalizer(run_dir, wb.lm, wb.layout, quantizer, finalize_settings(node), suite, metric_name, calib, out_dir)
