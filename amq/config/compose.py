"""The composition root: the one module that reads the composed config and turns it into objects.

`plan()` checks every setting that needs no model and builds the cheap components (predictor
factory, pruning, loop settings, tracker, evaluation cache, finalize settings); `prepare()` loads
the model and data and checks what needs them (targets, share groups, windows against the
model's context) before the first forward pass, then builds the metric and the proxy bank;
`prune()` runs the sensitivity stage; `assemble_search()` wires the loop. amq/train_search.py
calls them in that order; tests and scripts use the same functions.

Domain code raises `InvalidArgument` about its own parameters; `build()` and `settings_of()` map
it to the setting the user wrote, so no domain module knows a Hydra path.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
import yaml
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from amq.config.check import check_settings
from amq.data.corpora import TextSplits, keep_parsed
from amq.data.tokens import CalibrationSpec, calibration_windows
from amq.errors import ConfigError, InvalidArgument, setting_for, settings_of
from amq.evaluation.perplexity import PerplexityProtocol, perplexity_windows
from amq.metrics.base import QualityMetric
from amq.modeling.discovery import Coverage, ModelLayout, coverage, discover_layout
from amq.predictors.table_prior import PRIORS, table_model, with_prior
from amq.proxy.bank import ProxyBank, cached_width
from amq.quantizers.hqq import HQQFinalizer
from amq.quantizers.hqq_proxy import HQQQuantizer
from amq.run.resume import TIME_LIMIT, comparable_settings
from amq.run.stage_clock import StageClock
from amq.search import sensitivity
from amq.search.archive import Archive
from amq.search.confirmation import CONFIRM_FILE, Confirmations, ConfirmSettings, run_confirmation, window_seed
from amq.search.eval_cache import with_cache
from amq.search.evaluator import ProxyEvaluator
from amq.search.loop import IterativeSearch, SearchSettings, search_bits_range
from amq.search.output_error import estimate_middle_widths, output_errors
from amq.search.seeding import SEED_ALLOCATORS, sensitivity_seeds
from amq.search.space import EXPERT_GENES, SearchSpace, shared_groups
from amq.search.table_shrinkage import shrink_middle_widths

if TYPE_CHECKING:  # transformers is slow to import: settings errors come before it
    from amq.evaluation.suite import EvalSuite
    from amq.finalize.settings import FinalizeSettings
    from amq.finalize.stage import Finalizer
    from amq.modeling.loading import LoadedModel

log = logging.getLogger(__name__)

# An absolute path: the same for `python -m amq.train_search`, the `amq-*` scripts and tests.
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")

# Settings whose path is not <node the object was built from>.<argument>.
SPACE_SETTINGS = {
    "bits": "search.bits",
    "bit_choices": "search.bits",
    "keep_top": "search.pruning.keep_top",
    "pruned": "search.pruning.threshold",
    "share_groups": "search.share_groups",
    "expert_genes": "search.expert_genes",
    "targets": "search.targets",
    "group_size": "quantizer.group_size",
}
LOOP_SETTINGS = {
    "iterations": "budget.iterations",
    "n_initial_random": "budget.n_initial_random",
    "batch_size": "budget.batch_size",
    "bits_window": "search.bits_window",
    "target_slots": "search.target_slots",
    "resolve_moves": "search.resolve_moves",
    "": "budget",
}
CALIBRATION_SETTINGS = {"n_samples": "budget.n_samples", "seq_len": "budget.seq_len", "docs": "data"}
MODEL_SETTINGS = {
    "dtype": "model.source.dtype",
    "arch": "model.source.arch",
    "seed": "model.source.seed",
    "overrides": "model.source.overrides",
}  # the others read model.<argument>, as the README's table shows
FINALIZE_SETTINGS = {
    "bits": "finalize.bits",
    "group_size": "quantizer.group_size",
    "calib": "finalizer",
    "window": "finalize.window",
    "max_windows": "finalize.max_windows",
}


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """conf/train_search.yaml composed with `overrides`, outside a Hydra run (scripts, notebooks)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train_search", overrides=list(overrides))


def build(node: DictConfig, setting: str, named: Mapping[str, str] | None = None, **kwargs: Any) -> Any:
    """instantiate() with bad settings turned into a one-line ConfigError naming the group."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, InvalidArgument):
            raise cause.as_setting(setting_for(cause.argument, setting, named)) from None
        if isinstance(cause, ConfigError):
            raise cause from None
        msg = str(cause or exc).splitlines()[0]
        raise ConfigError(setting, msg, f"the keys documented in conf/{setting.split('.')[0]}/") from None


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
    coverage: Coverage  # how much of the decoder the layout's linears hold (summary.json reports it)


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


MIN_COVERAGE = 0.99  # of the decoder's weight matrices (search.min_coverage): less, and the bits a run reports would not be the model's


def check_coverage(name: str, cov: Coverage, min_coverage: float = MIN_COVERAGE) -> None:
    """State what fraction of the decoder the search covers; refuse a model whose weight matrices
    lie largely outside the searched linears (a "4.5-bit" export would keep them unquantized),
    unless `search.min_coverage` accepts it knowingly."""
    log.info("coverage: the search covers %.1f%% of %s's decoder weight matrices (%d of %d parameters)", 100 * cov.fraction, name, cov.covered, cov.total)
    if cov.uncovered:
        largest = sorted(cov.uncovered, key=cov.uncovered.get, reverse=True)
        log.info("coverage: kept in 16 bits and not counted in the bits: %d tensors, the largest %s", len(largest), ", ".join(largest[:3]))
    if cov.fraction < min_coverage:
        examples = sorted(cov.uncovered, key=cov.uncovered.get, reverse=True)[:2]
        raise ConfigError(
            "model",
            f"{100 * (1 - cov.fraction):.1f}% of {name}'s decoder weights are in layers amq cannot search (e.g. {', '.join(examples)}); "
            "they would stay unquantized and unaccounted for in the bits",
            f"a model whose decoder weights are linear layers (docs/architectures.md), or search.min_coverage below {cov.fraction:.3f} to accept it",
        )


def load_model_and_data(cfg: DictConfig) -> ModelAndData:
    """Load the model, discover its linears and read the data (no proxy, no metric)."""
    quiet_libraries()
    set_threads(cfg.num_threads)
    cache_dir = Path(cfg.paths.cache_dir)
    source, corpus = build(cfg.model.source, "model", MODEL_SETTINGS), keep_parsed(build(cfg.data, "data"), cache_dir)
    splits = corpus.load()  # before the model: text that cannot be read (offline hub data) fails at once
    with settings_of("model", MODEL_SETTINGS):
        lm = source.load(cache_dir)
    with settings_of("model"):
        layout = discover_layout(lm.model)
    log.info("model %s: %d decoder blocks (%s), %d linears", lm.name, layout.n_blocks, layout.blocks_name, len(layout.linears))
    cov = coverage(lm.model, layout)
    check_coverage(lm.name, cov, float(cfg.search.get("min_coverage", MIN_COVERAGE)))
    return ModelAndData(lm, layout, splits, cache_dir, cov)


@dataclass
class SearchPlan:
    """What the config decides about a search, built and checked before any model loads."""

    seed: int
    calibration: CalibrationSpec
    sensitivity_samples: int
    pruning: sensitivity.Pruning
    share_groups: list[list[str]] | None
    expert_genes: str
    settings: SearchSettings
    make_predictor: Callable[..., Any]  # seed= -> a fresh predictor
    predictor_name: str
    sensitivity_seeds: int
    seed_allocator: str
    eval_cache: Any
    eval_cache_record: dict
    tracker: Any
    finalize: "FinalizeSettings | None"
    max_minutes: float | None
    confirm: ConfirmSettings = ConfirmSettings()  # the confirmation pass after the search (off by default)
    sensitivity_widths: str = sensitivity.SENSITIVITY_WIDTHS[0]  # lowest | all | estimated: the widths each linear is probed at
    predictor_prior: str = PRIORS[0]  # none | table: the predictor learns what the table's additive model leaves
    shrink_table: bool = False  # shrink the middle widths' damages toward their role's ratio of the lowest width's
    plot_every_s: float = 0.0  # front.png and predictor.png redrawn after an iteration at most this often (always at the end)


def plan(cfg: DictConfig) -> SearchPlan:
    """Every setting of a search that needs no model, checked (unknown keys, types, values) and
    built, in the time it takes to read the config."""
    check_settings(cfg, CONF_DIR)
    make_predictor = build(cfg.predictor, "predictor")
    try:
        with settings_of("predictor"):
            make_predictor(seed=0)  # a partial: construct once now so its settings fail fast
    except TypeError as exc:
        raise ConfigError("predictor", str(exc), "the keys documented in conf/predictor/") from None
    pruning = build(cfg.search.pruning, "search.pruning")
    settings = search_settings(cfg)
    confirm = build(cfg.search.confirm, "search.confirm") if "confirm" in cfg.search else ConfirmSettings()
    tracker = build(cfg.logger, "logger")
    finalize = finalize_settings(cfg.finalize) if cfg.finalize.enabled else None
    if finalize is not None:
        check_finalize_components(cfg)  # before the search
    eval_cache = build(cfg.eval_cache, "eval_cache")
    for key in ("seed", "data_seed"):
        if int(cfg[key]) < 0:
            raise ConfigError(key, f"{cfg[key]}", "an integer >= 0")
    if int(cfg.search.sensitivity_seeds) < 0:
        raise ConfigError("search.sensitivity_seeds", f"{cfg.search.sensitivity_seeds}", "an integer >= 0 (0: the reference's uniform + random initial design)")
    if cfg.search.seed_allocator not in SEED_ALLOCATORS:
        raise ConfigError("search.seed_allocator", f"{cfg.search.seed_allocator!r}", " or ".join(SEED_ALLOCATORS))
    sensitivity_widths = cfg.search.get("sensitivity_widths", sensitivity.SENSITIVITY_WIDTHS[0])
    if sensitivity_widths not in sensitivity.SENSITIVITY_WIDTHS:
        raise ConfigError("search.sensitivity_widths", f"{sensitivity_widths!r}", " or ".join(sensitivity.SENSITIVITY_WIDTHS))
    predictor_prior = _predictor_prior(cfg)
    shrink_table = bool(cfg.search.get("shrink_table", False))
    if shrink_table and sensitivity_widths != "all":
        raise ConfigError(
            "search.shrink_table",
            f"true with search.sensitivity_widths={sensitivity_widths}",
            "search.sensitivity_widths=all (the middle widths it shrinks are probed only then), or search.shrink_table=false",
        )
    max_minutes = cfg.budget.max_minutes
    search_deadline(max_minutes, 0.0)  # refuses a bad limit now
    min_coverage = cfg.search.get("min_coverage", MIN_COVERAGE)
    if isinstance(min_coverage, bool) or not isinstance(min_coverage, (int, float)) or not 0.0 <= float(min_coverage) <= 1.0:
        raise ConfigError("search.min_coverage", f"{min_coverage!r}", "a fraction from 0 to 1, e.g. 0.99")
    _check_targets_given(cfg)
    plot_every_s = cfg.get("plot_every_s", 0.0)
    if isinstance(plot_every_s, bool) or not isinstance(plot_every_s, (int, float)) or not plot_every_s >= 0:
        raise ConfigError("plot_every_s", f"{plot_every_s!r}", "a number of seconds >= 0 (0: redraw the plots after every iteration)")
    return SearchPlan(
        seed=int(cfg.seed),
        calibration=calibration_spec(cfg),
        sensitivity_samples=int(cfg.budget.sensitivity_samples),
        pruning=pruning,
        share_groups=shared_precision_groups(cfg),
        expert_genes=expert_genes(cfg),
        settings=settings,
        make_predictor=make_predictor,
        predictor_name=str(cfg.predictor._target_).rsplit(".", 1)[-1] + (f" + {predictor_prior} prior" if predictor_prior != "none" else ""),
        sensitivity_seeds=int(cfg.search.sensitivity_seeds),
        seed_allocator=str(cfg.search.seed_allocator),
        eval_cache=eval_cache,
        eval_cache_record=OmegaConf.to_container(cfg.eval_cache, resolve=True),
        tracker=tracker,
        finalize=finalize,
        max_minutes=None if max_minutes is None else float(max_minutes),
        confirm=confirm,
        sensitivity_widths=str(sensitivity_widths),
        predictor_prior=predictor_prior,
        shrink_table=shrink_table,
        plot_every_s=float(plot_every_s),
    )


def search_deadline(max_minutes: object, started: float) -> float | None:
    """The time.monotonic() value the search must end by, `budget.max_minutes` after `started` (None: no limit)."""
    if max_minutes is None:
        return None
    if isinstance(max_minutes, bool) or not isinstance(max_minutes, (int, float)) or not max_minutes > 0:
        raise ConfigError(TIME_LIMIT, f"{max_minutes!r}", "a number of minutes > 0, or null for no limit")
    return started + 60.0 * float(max_minutes)


def expert_genes(cfg: DictConfig) -> str:
    """search.expert_genes, checked: how mixture-of-experts linears map to genes."""
    value = str(cfg.search.get("expert_genes", EXPERT_GENES[0]))
    if value not in EXPERT_GENES:
        raise ConfigError("search.expert_genes", repr(value), " or ".join(EXPERT_GENES))
    return value


def shared_precision_groups(cfg: DictConfig) -> list[list[str]] | None:
    """search.share_groups as plain lists (None: every linear its own gene)."""
    return OmegaConf.to_container(cfg.search.share_groups, resolve=True) if cfg.search.share_groups else None


def _check_targets_given(cfg: DictConfig) -> None:
    """search.targets must name at least one budget (the seeds, the reports and finalize work at
    them); an empty finalize.targets is reported under the setting that made it empty."""
    named = [("search.targets", cfg.search.targets)]
    if cfg.finalize.enabled and not OmegaConf.is_interpolation(cfg.finalize, "targets"):
        named.append(("finalize.targets", cfg.finalize.targets))
    for setting, targets in named:
        if targets is None or (not isinstance(targets, (int, float)) and len(targets) == 0):
            raise ConfigError(setting, "no targets given", "a list of average-bits budgets, e.g. [4.0, 4.5]")


def calibration_spec(cfg: DictConfig) -> CalibrationSpec:
    """The calibration windows of a true evaluation (budget.n_samples x budget.seq_len, data_seed)."""
    with settings_of(named=CALIBRATION_SETTINGS):
        return CalibrationSpec(int(cfg.budget.n_samples), int(cfg.budget.seq_len), seed=int(cfg.data_seed))


def context_length(model: torch.nn.Module) -> int | None:
    """The longest sequence the model was trained for (None: its config doesn't say)."""
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)()
    n = getattr(config, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def check_window(seq_len: int, lm: "LoadedModel", setting: str) -> None:
    """Refuse windows longer than the model's context before any forward pass runs on them."""
    context = context_length(lm.model)
    if context is not None and seq_len > context:
        raise ConfigError(setting, f"{seq_len} tokens is longer than {lm.name}'s context of {context} tokens", f"an integer from 8 to {context}")


def check_serve_with(serve_with: str | None, bits: list[int], group_size: int, layout: ModelLayout, shared: bool = False, integer_zero: bool = False) -> None:
    """`search.serve_with=fast`: every width and layer of the space has a kernel in amq.runtime;
    `vllm`: the checkpoints are ones vLLM serves whole (`compressed_tensors.check_vllm_servable`).

    Without shared-precision groups (`shared`), `fast` logs that sibling projections of different
    widths are served apart: `amq.runtime.convert` stacks q/k/v and gate/up into one layer only
    where they share a width, which `search=amq_fused` guarantees."""
    if serve_with is None:
        return
    from amq.runtime.convert import SERVE_WITH, check_servable

    if serve_with not in SERVE_WITH:
        raise ConfigError("search.serve_with", repr(serve_with), "null or " + ", ".join(SERVE_WITH))
    if serve_with == "vllm":
        from amq.quantizers.compressed_tensors import check_vllm_servable

        check_vllm_servable(bits, group_size, shared, integer_zero)
        return
    check_servable(bits, group_size, (li.in_features for li in layout.linears))
    if not shared:
        log.info(
            "search.serve_with=fast: q/k/v and gate/up sets of different widths run as separate products; "
            "search=amq_fused gives each set one width so the runtime stacks it (faster decoding; docs/benchmarks.md, 'Stacked siblings')"
        )


def hint_metric(name: str, bits: list[int]) -> None:
    """JSD (the reference's metric) is bounded, so where 2- and 3-bit widths compete it undercounts
    what a 2-bit linear costs; say so where a search is set up that way (docs/benchmarks.md, "KL
    instead of JSD": measured in {2, 3, 4}; in {2, 4} the two metrics were within a few percent)."""
    if name == "jsd" and 2 in bits and 3 in bits:
        log.info(
            "metric jsd with 2- and 3-bit widths: JSD saturates where a 2-bit linear wrecks the output; metric=kl picked configurations "
            "with 14-55% lower held-out perplexity in {2, 3, 4} (docs/benchmarks.md, 'KL instead of JSD as the search metric')"
        )


def prepare(cfg: DictConfig, clock: StageClock | None = None) -> Workbench:
    """Model, layout, data, proxy and metric, with every setting checked before the first forward pass
    (timed by `clock` as the stages load, reference and proxy_build)."""
    clock = clock or StageClock()
    torch.manual_seed(int(cfg.seed))
    quantizer = build(cfg.quantizer, "quantizer")
    calib = calibration_spec(cfg)
    bits = [int(b) for b in cfg.search.bits]

    with clock.stage("load"):
        md = load_model_and_data(cfg)
    lm, layout = md.lm, md.layout
    with settings_of("quantizer", SPACE_SETTINGS):
        quantizer.validate(bits, layout.linears)
        full_space = SearchSpace(layout.linears, bits, quantizer.group_size, share_patterns=shared_precision_groups(cfg), expert_genes=expert_genes(cfg))
        targets = full_space.check_targets(cfg.search.targets)
        integer_zero = bool(cfg.finalizer.get("integer_zero", False))
        check_serve_with(cfg.search.get("serve_with"), bits, quantizer.group_size, layout, bool(full_space.share_patterns), integer_zero)
    check_window(calib.seq_len, lm, "budget.seq_len")
    if cfg.finalize.enabled:  # before the proxy and sensitivity: budgets below every configuration fail now
        finalize_settings(cfg.finalize).check_reachable(full_space)
        if build(cfg.finalizer, "finalizer").needs_calibration:
            check_window(int(cfg.finalize.seq_len), lm, "finalize.seq_len")
        if cfg.finalize.evaluate:  # held-out texts long enough for one window
            protocol = perplexity_protocol(cfg.finalize, lm.add_bos).fit_to(lm.model)
            with settings_of(named=FINALIZE_SETTINGS):
                for docs in md.splits.heldout.values():
                    perplexity_windows(lm.tokenizer, docs, protocol, md.cache_dir, md.splits.preparation)
    with clock.stage("reference"):
        with settings_of(named=CALIBRATION_SETTINGS):
            tokens = calibration_windows(lm.tokenizer, md.splits.calibration, calib, lm.add_bos, md.cache_dir)
        # the metric's reference distributions come from the unquantized model, before the bank swaps anything
        metric = build(cfg.metric, "metric", model=lm.model, tokens=tokens)
        if hasattr(metric, "reuse_prefix"):  # passes start at the first changed block
            metric.reuse_prefix(lm.model.get_submodule(layout.blocks_name))
        hint_metric(metric.name, bits)
    with clock.stage("proxy_build"), settings_of("quantizer"):
        bank = ProxyBank(lm.model, layout, quantizer, bits, storage=quantizer.storage).build(md.cache_dir / "proxy", lm.fingerprint)
    return Workbench(lm, layout, md.splits, md.cache_dir, md.coverage, tokens, bank, metric, bits, targets)


def _predictor_prior(cfg: DictConfig) -> str:
    """`search.predictor_prior`, checked against the predictor: the residual it hands on can be
    negative, which a predictor fitting log(metric) cannot take."""
    prior = cfg.search.get("predictor_prior", PRIORS[0])
    if prior not in PRIORS:
        raise ConfigError("search.predictor_prior", f"{prior!r}", " or ".join(PRIORS))
    if prior != "none" and cfg.predictor.get("target", "none") != "none":
        raise ConfigError(
            "search.predictor_prior",
            f"{prior} with predictor.target={cfg.predictor.target} (the predictor then fits residuals, which can be negative)",
            "predictor.target=none, or search.predictor_prior=none",
        )
    return str(prior)


def search_settings(cfg: DictConfig) -> SearchSettings:
    """The loop's amount of work and operators, from the budget and search groups."""
    nsga = build(cfg.search.nsga, "search.nsga")
    with settings_of(named=LOOP_SETTINGS):
        return SearchSettings(
            n_initial_random=int(cfg.budget.n_initial_random),
            iterations=int(cfg.budget.iterations),
            batch_size=int(cfg.budget.batch_size),
            nsga=nsga,
            bits_window=tuple(cfg.search.bits_window) if cfg.search.bits_window else None,
            kappa=float(cfg.search.kappa),
            target_slots=float(cfg.search.target_slots),
            resolve_moves=bool(cfg.search.resolve_moves),
        )


def prune(
    wb: Workbench,
    pruning: sensitivity.Pruning,
    sensitivity_samples: int,
    share_groups: Sequence[Sequence[str]] | None,
    expert_genes: str = EXPERT_GENES[0],
    widths: str = sensitivity.SENSITIVITY_WIDTHS[0],
    shrink: bool = False,
) -> tuple[sensitivity.SensitivityTable, SearchSpace]:
    """Stage: sensitivity (cached) and pruning; returns the table and the pruned search space.

    Linears that share a gene as experts of one projection are probed together; with `widths`
    `all` also at every width between the lowest and the highest (pruning reads the lowest), with
    `estimated` those widths' damages estimated from one pass over the calibration windows
    (amq.search.output_error), and with `shrink` probed middle widths' damages shrunk by role
    (amq.search.table_shrinkage)."""
    sens_metric = wb.metric.subset(sensitivity_samples)
    context = {**evaluation_context(wb, sens_metric, sensitivity.measure), "description": sens_metric.description}
    units = shared_groups(wb.layout.linears, None, expert_genes)
    table = sensitivity.cached_measure(wb.bank, sens_metric, wb.cache_dir / "sensitivity", context, units)
    if widths == "all" and len(wb.bits) > 2:
        mids = [sensitivity.cached_measure(wb.bank, sens_metric, wb.cache_dir / "sensitivity", context, units, low=b) for b in wb.bits[1:-1]]
        table = table.with_mid(mids)
    elif widths == "estimated" and len(wb.bits) > 2:
        errors = output_errors(wb.bank, wb.tokens, units, wb.bits)
        table = estimate_middle_widths(table, errors, int(wb.tokens.numel()))
    if shrink:
        with settings_of(named={"table": "search.shrink_table"}):
            table = shrink_middle_widths(table)
    with settings_of(named=SPACE_SETTINGS):
        space = SearchSpace(wb.layout.linears, wb.bits, wb.bank.quantizer.group_size, pruning.pruned(table), share_groups, pruning.keep_top, expert_genes)
    log.info(
        "pruning: %d of %d linears limited to the top %d width(s) %s (threshold %.2f x median %s); %d genes, %.3f-%.3f bits",
        len(space.pruned),
        len(wb.layout.linears),
        pruning.keep_top,
        wb.bits[-pruning.keep_top :],
        pruning.threshold,
        pruning.score,
        space.n_genes,
        *space.bits_range(),
    )
    lo, _ = space.bits_range()
    for t in wb.targets:
        if t < lo:
            log.warning("target %.3g bits is below the pruned space's minimum %.3f: nothing will be reported there", t, lo)
    return table, space


def load_archive(space: SearchSpace, path: Path, metric_name: str) -> Archive:
    """The run's archive (the evaluations of an earlier process, when resuming)."""
    archive = Archive(space, path)
    with settings_of(named={"archive": "resume"}):
        archive.load(metric_name)
    return archive


def assemble_search(
    plan: SearchPlan,
    wb: Workbench,
    table: sensitivity.SensitivityTable,
    space: SearchSpace,
    archive: Archive,
    observers: Sequence[Callable[[dict, Archive], None]] = (),
    evaluation_guard: Any = None,
    deadline: float | None = None,
) -> IterativeSearch:
    """The search loop as amq-search runs it: true evaluations through the evaluation cache,
    knapsack seeds from the sensitivity table, the predictor and loop settings of the plan."""
    settings = plan.settings
    return IterativeSearch(
        space=space,
        evaluate=with_cache(ProxyEvaluator(wb.bank, wb.metric, space), plan.eval_cache, evaluation_context(wb), space),
        make_predictor=predictor_factory(plan, space, table),
        settings=settings,
        archive=archive,
        metric_name=wb.metric.name,
        targets=wb.targets,
        seed=plan.seed,
        observers=list(observers),
        seeder=lambda uniform_metric: sensitivity_seeds(
            space,
            table.damage,
            plan.sensitivity_seeds,
            search_bits_range(space, settings),
            wb.targets,
            uniform_metric,
            plan.seed_allocator,
            table.mid,
        ),
        evaluation_guard=evaluation_guard or contextlib.nullcontext,
        deadline=deadline,
    )


def predictor_factory(plan: SearchPlan, space: SearchSpace, table: sensitivity.SensitivityTable) -> Callable[[int], Any]:
    """seed -> a fresh predictor, under the sensitivity table's prior where the plan asks for it."""
    if plan.predictor_prior == "none":
        return lambda seed: plan.make_predictor(seed=seed)
    model = table_model(space, table.damage, table.baseline, table.mid)
    return lambda seed: with_prior(plan.make_predictor(seed=seed), model)


def confirmation_metric(cfg: DictConfig, wb: Workbench, samples: int) -> QualityMetric:
    """The search's metric on `samples` other calibration windows of the calibration split (their
    own seed, from data_seed), its reference taken from the unquantized model."""
    spec = CalibrationSpec(samples, int(cfg.budget.seq_len), seed=window_seed(int(cfg.data_seed)))
    with settings_of(named={**CALIBRATION_SETTINGS, "n_samples": "search.confirm.samples"}):
        tokens = calibration_windows(wb.lm.tokenizer, wb.splits.calibration, spec, wb.lm.add_bos, wb.cache_dir)
    wb.bank.restore()  # the reference distributions are the unquantized model's
    return build(cfg.metric, "metric", model=wb.lm.model, tokens=tokens)


def confirm(
    cfg: DictConfig, plan: SearchPlan, wb: Workbench, space: SearchSpace, archive: Archive, run_dir: Path, guard: Any = None
) -> tuple[dict, Confirmations]:
    """Stage: the confirmation pass over the finished archive (amq.search.confirmation); its
    measurements persist in the run directory, so a resumed run adds only the missing ones."""
    metric = confirmation_metric(cfg, wb, plan.confirm.samples)
    evaluate = with_cache(ProxyEvaluator(wb.bank, metric, space), plan.eval_cache, evaluation_context(wb, metric), space)
    store = Confirmations(archive, run_dir / CONFIRM_FILE, int(wb.tokens.shape[0]), plan.confirm.samples, wb.metric.name)
    result = run_confirmation(archive, store, evaluate, wb.targets, plan.confirm, guard or contextlib.nullcontext)
    result["tokens"] = len(store) * int(metric.tokens.numel())
    return result, store


def memory_settings(cfg: DictConfig) -> dict[str, Any]:
    """The settings an out-of-memory message tells the user to lower, with their values."""
    return {
        "metric.batch_size": cfg.metric.batch_size,
        "metric.chunk_tokens": cfg.metric.chunk_tokens,
        "quantizer.storage": cfg.quantizer.storage,
        "budget.n_samples": cfg.budget.n_samples,
        "budget.seq_len": cfg.budget.seq_len,
    }


def resume_settings(cfg: DictConfig) -> tuple[str | None, dict[str, Any], int]:
    """(resume=, the settings a continued run must share, budget.iterations)."""
    resume = cfg.resume
    return (None if not resume else str(resume)), comparable_settings(cfg), int(cfg.budget.iterations)


def config_record(cfg: DictConfig) -> tuple[str, dict]:
    """The run's settings, resolved: as config.yaml text, and as the tracker's config."""
    return OmegaConf.to_yaml(cfg, resolve=True), OmegaConf.to_container(cfg, resolve=True)


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
    formats = node.formats if node.formats is not None else []
    formats = [formats] if isinstance(formats, str) else list(formats)
    return FinalizeSettings(
        values, str(node.bits_convention), bool(node.evaluate), int(node.extra_front_points), bool(node.baselines), tuple(str(f) for f in formats)
    )


def perplexity_protocol(node: DictConfig, add_bos: bool) -> PerplexityProtocol:
    """The finalize node's held-out perplexity protocol (window, windows per text)."""
    with settings_of("finalize"):
        return PerplexityProtocol(int(node.window), None if node.max_windows is None else int(node.max_windows), add_bos)


def eval_suite(node: DictConfig, splits: TextSplits, add_bos: bool, cache_dir: Path) -> "EvalSuite":
    """Held-out texts of the run's data plus the finalize node's perplexity protocol and tasks."""
    from amq.evaluation.suite import EvalSuite
    from amq.finalize.settings import task_settings

    proto, tasks = perplexity_protocol(node, add_bos), task_settings(node)
    return EvalSuite(dict(splits.heldout), splits.description, proto, tasks, cache_dir, splits.preparation)


def check_finalize_components(cfg: DictConfig) -> None:
    """Build the final quantizer and the perplexity protocol and ready the zero-shot tasks now, so bad
    settings, an unreachable hub or missing task files fail before the minutes of work that come
    before the finalize stage."""
    from amq.finalize.settings import task_settings

    build(cfg.finalizer, "finalizer")
    if cfg.finalize.evaluate:
        perplexity_protocol(cfg.finalize, add_bos=False)
        tasks = task_settings(cfg.finalize)
        if tasks.tasks:
            from amq.evaluation.zeroshot import prepare_zero_shot

            prepare_zero_shot(tasks.tasks, cfg.paths.cache_dir, tasks.num_fewshot)


def finalizer_for(cfg: DictConfig, wb: ModelAndData, run_dir: Path, metric_name: str, out_dir: Path | None = None, keep_finished: bool = False) -> "Finalizer":
    """The finalize stage for a loaded model and data (calibration windows drawn from the calibration split).

    Models and reports go to `out_dir` (default: the run directory itself); `keep_finished` (a
    continued run) keeps the model folders its stopped process finished for the same configuration."""
    from amq.finalize.stage import Finalizer

    node = cfg.finalize
    quantizer = build(cfg.finalizer, "finalizer")
    calib = None
    if quantizer.needs_calibration:
        with settings_of("finalize", {"docs": "data"}):
            spec = CalibrationSpec(int(node.n_samples), int(node.seq_len), seed=int(cfg.data_seed))
            calib = calibration_windows(wb.lm.tokenizer, wb.splits.calibration, spec, wb.lm.add_bos, wb.cache_dir)
    suite = eval_suite(node, wb.splits, wb.lm.add_bos, wb.cache_dir) if node.evaluate else None
    proxy_results = _proxy_results(build(cfg.quantizer, "quantizer"), quantizer, wb)
    return Finalizer(run_dir, wb.lm, wb.layout, quantizer, finalize_settings(node), suite, metric_name, calib, out_dir, proxy_results, keep_finished)


def _proxy_results(proxy: Any, final: Any, wb: ModelAndData) -> Callable[[int, int], dict | None] | None:
    """Where the final quantizer is the proxy's HQQ with its settings, a reader of the proxy's cached
    results per (width, group size); else None (the finalizer quantizes everything itself)."""
    if not (isinstance(proxy, HQQQuantizer) and isinstance(final, HQQFinalizer)):
        return None
    if (proxy.axis, proxy.optimize, proxy.integer_zero) != (1, final.optimize, final.integer_zero):
        return None
    weight = wb.lm.model.get_submodule(wb.layout.names[0]).weight  # its dtype and device are the cache's key

    def read(width: int, group_size: int) -> dict | None:
        if group_size != proxy.group_size:
            return None
        return cached_width(wb.cache_dir / "proxy", wb.lm.fingerprint, proxy, wb.layout, weight, width)

    return read


def run_finalize(
    cfg: DictConfig, wb: ModelAndData, run_dir: Path, metric_name: str, bits: Sequence[int], out_dir: Path | None = None, keep_finished: bool = False
) -> dict:
    """The finalize stage (`finalizer_for`), run: exported models and their report."""
    finalizer = finalizer_for(cfg, wb, run_dir, metric_name, out_dir, keep_finished)
    with settings_of(named=FINALIZE_SETTINGS):
        return finalizer.run(list(bits))
