"""Search quality against the alternatives a user would pick, at equal true evaluations.

On the configured model, per seed, N = the true evaluations the AMQ search spends (its archive):

- amq:               the default search (`amq.train_search.run`, as `amq-search` runs it);
- amq, no pruning:   the same with `search.pruning.threshold=0` (more such arms: --variant);
- amq, no predictor: the same initial design (the search's own iteration 0), then NSGA-II whose
                     objective is the true evaluation, `batch_size` offspring per generation for
                     `iterations` generations (`amq.baselines.evolution`);
- random:            N random configurations drawn in the bits window;
- greedy / knapsack: the uniform configurations (they calibrate the width factors), then one
                     allocation per budget from the sensitivity table, budgets = the targets plus
                     evenly spaced levels across the bits window, N in all (fewer where two
                     budgets give the same allocation); `amq.baselines.greedy` / `.knapsack`;
- uniform:           every linear at each bit width.

Per method: its cost in calibration tokens forwarded (true evaluations, plus the sensitivity table
where the method uses it: `amq.bench.token_cost`, plus a search's confirmation pass where it ran
one: `search.confirm.samples`), hypervolume (one normalisation for all: metric
over uniform lowest-width's, bits over the bits window), and at each target the configuration with the lowest calibration metric at or
under it (where a search confirmed it, the best confirmed one over all its windows: the pick the
run ships), with its held-out perplexity on every held-out text of the data (proxy weights applied;
`amq.evaluation.perplexity`): the calibration text's held-out part (`PPL @ t`) and texts of other
domains (`PPL lee @ t` for the embedded Lee news corpus). A results.json of an earlier version
that lacks a text is completed on the next run with the same --out.
Greedy, knapsack and uniform do not depend on the seed and are computed once.

    python scripts/bench_quality.py num_threads=1                       # demo budget, seeds 0 1 2
    python scripts/bench_quality.py budget=smoke --seeds 0 --ppl-windows 2   # quick look
    python scripts/bench_quality.py num_threads=1 --variant "amq, knapsack seeds" search.seed_allocator=knapsack
    python scripts/bench_quality.py num_threads=1 --methods amq greedy knapsack   # only these rows

Any Hydra override of conf/train_search.yaml may be given. Results go to --out (results.json,
results.md, the AMQ run directories); rerunning with the same --out reuses what is finished.
"""

from __future__ import annotations

import gc
import json
import logging
import re
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from amq.baselines.evolution import true_evaluation_nsga2
from amq.baselines.greedy import greedy_allocations
from amq.bench.heldout import HeldoutPerplexity
from amq.bench.script_args import script_parser
from amq.bench.token_cost import TokenCost, sensitivity_probes
from amq.bits import CONVENTION_WITH_META
from amq.config import compose as amq_compose
from amq.config.compose import Workbench, prepare, prune
from amq.evaluation.perplexity import PerplexityProtocol
from amq.io import atomic_write_json, atomic_write_text, read_jsonl
from amq.search.archive import Archive
from amq.search.confirmation import CONFIRM_FILE, confirmed_pick, read_confirmed
from amq.search.evaluator import ProxyEvaluator, measured
from amq.search.knapsack import knapsack_allocations
from amq.search.loop import search_bits_range
from amq.search.pareto import HV_CONVENTION, normalized_hypervolume
from amq.search.seeding import additive_damage, budget_levels, width_factors
from amq.search.space import SearchSpace
from amq.train_search import run as run_search

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("amq.bench_quality")

METHODS = ["amq", "amq, no pruning", "amq, no predictor", "random", "greedy", "knapsack", "uniform"]
WITHOUT_TABLE = ("random", "uniform")  # every other method (variants too) starts from the sensitivity table


@dataclass
class Evaluated:
    """Every configuration one method truly evaluated: bits per linear, average bits, calibration metric."""

    configs: list[dict[str, int]]
    avg_bits: np.ndarray
    metric: np.ndarray
    seconds: float
    confirmed: np.ndarray | None = None  # a search's confirmation pass: the metric over all its windows (NaN: not confirmed)
    confirm_tokens: int = 0  # calibration tokens that pass forwarded, on top of the true evaluations

    @classmethod
    def from_archive(cls, archive: Archive, seconds: float) -> "Evaluated":
        _, metric, bits = archive.arrays()
        return cls([archive.space.to_bits(r.genes) for r in archive.records], bits, metric, seconds)

    def __add__(self, other: "Evaluated") -> "Evaluated":
        return Evaluated(
            self.configs + other.configs,
            np.concatenate([self.avg_bits, other.avg_bits]),
            np.concatenate([self.metric, other.metric]),
            self.seconds + other.seconds,
        )


def evaluate_distinct(space: SearchSpace, evaluate: ProxyEvaluator, genes: np.ndarray, skip: Sequence[np.ndarray] = ()) -> Evaluated:
    """True evaluation of each distinct row of `genes`, leaving out rows equal to one in `skip`."""
    skipped = {space.key(g) for g in skip}
    archive = Archive(space)
    t0 = time.perf_counter()
    for g in genes:
        if space.key(g) not in skipped and g not in archive:
            archive.add(g, evaluate(g), 0, "metric")
    return Evaluated.from_archive(archive, time.perf_counter() - t0)


# ------------------------------------------------------------------ methods
def run_amq(cfg: DictConfig) -> Evaluated:
    """The search as `amq-search` runs it; its search time excludes model loading, proxy and sensitivity."""
    run_dir = Path(cfg.paths.output_dir)
    if not (run_dir / "summary.json").exists():
        shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted earlier attempt: start it over
        run_search(cfg)
        gc.collect()
    summary = json.loads((run_dir / "summary.json").read_text())
    recs = list(read_jsonl(run_dir / "archive.jsonl"))
    confirmed = read_confirmed(run_dir / CONFIRM_FILE, cfg.metric.kind)
    confirmation = summary.get("confirmation") or {}
    return Evaluated(
        [r["config"]["bits"] for r in recs],
        np.array([r["avg_bits"] for r in recs]),
        np.array([np.inf if r["metrics"][cfg.metric.kind] is None else r["metrics"][cfg.metric.kind] for r in recs]),
        float(summary["seconds"]["search"]) + float(confirmation.get("seconds", 0.0)),
        np.array([confirmed.get(tuple(sorted(r["config"]["bits"].items())), np.nan) for r in recs]) if confirmed else None,
        int(confirmation.get("tokens", 0)),
    )


def run_no_predictor(cfg: DictConfig, wb: Workbench, amq_dir: Path) -> Evaluated:
    """The search's own initial design (read from its archive), then NSGA-II on true evaluations."""
    plan = amq_compose.plan(cfg)
    settings = plan.settings
    _, space = prune(wb, plan.pruning, plan.sensitivity_samples, plan.share_groups, widths=plan.sensitivity_widths)
    archive = Archive(space)
    initial_s = 0.0
    for r in read_jsonl(amq_dir / "archive.jsonl"):
        if r["iteration"] == 0:
            archive.add(space.from_bits(r["config"]["bits"]), measured(r["metrics"][cfg.metric.kind], r["eval_seconds"], cfg.metric.kind), 0, cfg.metric.kind)
            initial_s += r["eval_seconds"]
    t0 = time.perf_counter()
    true_evaluation_nsga2(archive, ProxyEvaluator(wb.bank, wb.metric, space), settings, cfg.metric.kind, seed=int(cfg.seed))
    return Evaluated.from_archive(archive, initial_s + time.perf_counter() - t0)


def run_allocator(
    full: SearchSpace,
    evaluate: ProxyEvaluator,
    uniform: Evaluated,
    allocate: Callable[[Sequence[float]], np.ndarray],
    n: int,
    brange: tuple[float, float],
    targets: Sequence[float],
) -> Evaluated:
    """The uniform configurations, then one allocation per budget: `n` true evaluations at most."""
    t0 = time.perf_counter()
    genes = allocate(budget_levels(n - len(uniform.configs), brange, targets))
    alloc_s = time.perf_counter() - t0
    ev = evaluate_distinct(full, evaluate, genes, skip=[full.from_bits(c) for c in uniform.configs])
    ev.seconds += alloc_s
    return uniform + ev


# ------------------------------------------------------------------ reporting
def summarise(ev: Evaluated, targets: Sequence[float], scale: float, brange: tuple[float, float], ppl: HeldoutPerplexity) -> dict:
    finite = np.isfinite(ev.metric)
    row = {
        "true_evaluations": len(ev.configs),
        "seconds": round(ev.seconds, 1),
        "hypervolume": normalized_hypervolume(ev.metric[finite], ev.avg_bits[finite], scale, brange),
        "at_target": {},
    }
    if ev.confirm_tokens:
        row["confirm_tokens"] = ev.confirm_tokens
    confirmed = ev.confirmed if ev.confirmed is not None else np.full(len(ev.configs), np.nan)
    for t in targets:
        i = confirmed_pick(np.where(finite, ev.metric, np.inf), ev.avg_bits, confirmed, t)  # the pick the run ships
        if i is not None:
            by_text = ppl(ev.configs[i])
            row["at_target"][f"{t:g}"] = {
                "avg_bits": float(ev.avg_bits[i]),
                "jsd": float(ev.metric[i]),
                "perplexity": by_text[ppl.texts[0]],
                "perplexity_by_text": by_text,
            }
            if np.isfinite(confirmed[i]):
                row["at_target"][f"{t:g}"]["confirmed_jsd"] = float(confirmed[i])
    return row


def _cell(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    if len(values) == 1 or max(values) - min(values) < 1e-12:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def markdown_table(results: dict[str, dict[str, dict]], targets: Sequence[float], cost: TokenCost, texts: Sequence[str], metric: str = "jsd") -> str:
    """One row per method (the fixed ones first, then any variants), mean ± std over seeds; the
    calibration metric (`metric`'s kind; stored under "jsd" whatever it is) as `<KIND> @ t`; held-out
    perplexity of the first text as `PPL @ t`, of every other text as `PPL <text> @ t`."""
    ts = [f"{t:g}" for t in targets]
    ppl_heads = [f"PPL @ {t}" if i == 0 else f"PPL {text} @ {t}" for i, text in enumerate(texts) for t in ts]
    head = ["method", "true evals", "calibration tokens (M)", "wall s", "hypervolume", *[f"{metric.upper()} @ {t}" for t in ts], *ppl_heads]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for method in [*METHODS, *(m for m in results if m not in METHODS)]:
        rows = list(results.get(method, {}).values())
        if not rows:
            continue
        cells = [
            method,
            _cell([r["true_evaluations"] for r in rows], ".0f"),
            _cell([(cost.of(r["true_evaluations"], method not in WITHOUT_TABLE) + r.get("confirm_tokens", 0)) / 1e6 for r in rows], ".2f"),
            _cell([r["seconds"] for r in rows], ".0f"),
            _cell([r["hypervolume"] for r in rows], ".3f"),
        ]
        cells += [_cell([r["at_target"][t]["jsd"] for r in rows if t in r["at_target"]], ".4f") for t in ts]
        for text in texts:
            cells += [_cell([v for r in rows if (v := _perplexity(r, t, text)) is not None], ".1f") for t in ts]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _perplexity(row: dict, target: str, text: str) -> float | None:
    """A row's held-out perplexity of `text` at `target`, None where it was not measured."""
    return row["at_target"].get(target, {}).get("perplexity_by_text", {}).get(text)


def complete(row: dict | None, texts: Sequence[str]) -> bool:
    """Whether a stored row has every held-out text at every target it reached (rows of an earlier
    version measured the first text only: they are summarised again)."""
    return row is not None and all(_perplexity(row, t, text) is not None for t in row["at_target"] for text in texts)


# ------------------------------------------------------------------ driver
def _compose(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train_search", overrides=overrides)


def main() -> None:
    ap = script_parser(__doc__, "Hydra overrides of conf/train_search.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_quality")
    ap.add_argument("--ppl-window", type=int, default=512, help="held-out perplexity window (tokens)")
    ap.add_argument("--ppl-windows", type=int, default=16, help="how many held-out windows")
    ap.add_argument(
        "--variant",
        nargs="+",
        action="append",
        default=[],
        metavar=("NAME", "OVERRIDE"),
        help="one more AMQ arm: a name, then the overrides that make it (repeatable)",
    )
    ap.add_argument("--methods", nargs="+", metavar="NAME", help="run only these methods (names as in the table; default: all)")
    args = ap.parse_args()
    variants = {"amq, no pruning": ["search.pruning.threshold=0"], **{v[0]: v[1:] for v in args.variant}}
    valid = [*METHODS, *(v for v in variants if v not in METHODS)]
    methods = set(args.methods or valid)
    if unknown := sorted(methods - set(valid)):
        ap.error(f"unknown --methods {', '.join(map(repr, unknown))}; valid: {', '.join(map(repr, valid))}")
    variants = {name: extra for name, extra in variants.items() if name in methods}
    # the default search sets N (the true evaluations every other method gets) and the no-predictor start
    needs_amq = bool(methods & {"amq", "amq, no predictor", "random", "greedy", "knapsack"})
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    # every method measures its own evaluations (no shared cache), and the search stops at the front
    base = ["logger=none", "eval_cache=none", "finalize.enabled=false", *args.overrides]
    cfg0 = _compose([*base, f"seed={args.seeds[0]}", f"paths.output_dir={args.out}"])
    wb = prepare(cfg0)
    plan0 = amq_compose.plan(cfg0)
    settings = plan0.settings
    full = SearchSpace(wb.layout.linears, wb.bits, wb.bank.quantizer.group_size, share_patterns=plan0.share_groups)
    evaluate = ProxyEvaluator(wb.bank, wb.metric, full)
    brange = search_bits_range(full, settings)
    ppl = HeldoutPerplexity(wb, PerplexityProtocol(args.ppl_window, args.ppl_windows, wb.lm.add_bos))
    table, _ = prune(wb, plan0.pruning, plan0.sensitivity_samples, plan0.share_groups, widths=plan0.sensitivity_widths, shrink=plan0.shrink_table)

    out_json = args.out / "results.json"
    state = json.loads(out_json.read_text()) if out_json.exists() else {}
    results: dict[str, dict[str, dict]] = state.get("methods", {})

    def record(method: str, seed: str, ev: Evaluated) -> None:
        results.setdefault(method, {})[seed] = summarise(ev, wb.targets, scale, brange, ppl)
        log.info("%s (seed %s): %s", method, seed, json.dumps(results[method][seed]))
        atomic_write_json(out_json, {"protocol": protocol, "methods": results})

    windows, length = wb.tokens.shape
    per_probe = max(1, min(plan0.sensitivity_samples, windows)) * length  # as `metric.subset`
    cost = TokenCost(windows * length, sensitivity_probes(table), per_probe, table.estimate_tokens)
    t0 = time.perf_counter()
    uniform = evaluate_distinct(full, evaluate, np.stack([full.uniform(b) for b in wb.bits]))
    scale = float(uniform.metric[0])  # all-lowest: the common normalisation of every method's hypervolume
    protocol = {
        "model": wb.lm.name,
        "overrides": args.overrides,
        "variants": variants,
        "seeds": args.seeds,
        "calibration": wb.metric.description,
        "data": wb.splits.description,
        "bits_convention": CONVENTION_WITH_META,
        "hypervolume": HV_CONVENTION,
        "hypervolume_scale": {"metric": scale, "bits_range": list(brange)},
        "perplexity": ppl.describe(),
        "unquantized_perplexity": ppl(None),
        "sensitivity_seconds": table.seconds,
        "calibration_tokens": cost.to_dict(),
    }
    if "uniform" in methods and not complete(results.get("uniform", {}).get("all"), ppl.texts):
        record("uniform", "all", uniform)
    factors = width_factors(full, dict(zip(wb.bits, uniform.metric)), table.damage)
    damage = additive_damage(full, table.damage, factors, table.mid)
    log.info("uniform configurations and reference perplexity: %.0fs; width factors %s", time.perf_counter() - t0, np.round(factors, 4).tolist())

    for seed in args.seeds:
        s = str(seed)
        cfg = _compose([*base, f"seed={seed}", f"paths.output_dir={args.out / f'seed{seed}' / 'amq'}"])
        if needs_amq:
            amq = run_amq(cfg)
            n = len(amq.configs)
        if "amq" in methods and not complete(results.get("amq", {}).get(s), ppl.texts):
            record("amq", s, amq)
        for name, extra in variants.items():
            if not complete(results.get(name, {}).get(s), ppl.texts):
                run_dir = args.out / f"seed{seed}" / re.sub(r"\W+", "_", name).strip("_")
                record(name, s, run_amq(_compose([*base, f"seed={seed}", *extra, f"paths.output_dir={run_dir}"])))
        if "amq, no predictor" in methods and not complete(results.get("amq, no predictor", {}).get(s), ppl.texts):
            record("amq, no predictor", s, run_no_predictor(cfg, wb, Path(cfg.paths.output_dir)))
        if "random" in methods and not complete(results.get("random", {}).get(s), ppl.texts):
            genes = full.random(np.random.default_rng(10_000 + seed), n, settings.bits_window and brange)
            record("random", s, evaluate_distinct(full, evaluate, genes))
        for method, allocate in (("greedy", lambda b: greedy_allocations(full, damage, b)), ("knapsack", lambda b: knapsack_allocations(full, damage, b))):
            if method in methods and not complete(results.get(method, {}).get("all"), ppl.texts):
                record(method, "all", run_allocator(full, evaluate, uniform, allocate, n, brange, wb.targets))

    md = markdown_table(results, wb.targets, cost, ppl.texts, wb.metric.name)
    unquantized = ", ".join(f"{text} {v:.2f}" for text, v in protocol["unquantized_perplexity"].items())
    md += f"\n\nunquantized held-out perplexity: {unquantized}\n"
    atomic_write_text(args.out / "results.md", md)
    print(md)


if __name__ == "__main__":
    main()
