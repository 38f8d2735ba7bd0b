"""Cheaper sensitivity tables against the most expensive one: do they keep what the table is for?

The sensitivity stage probes every linear (lowest width, all others highest) on the first
`budget.sensitivity_samples` calibration windows. The table is used for (a) a ranking of the
linears, (b) the pinned set of search-space pruning and (c) the knapsack allocations that seed the
search (and, on SmolLM2, match it). This script measures each against the reference table of all
`budget.n_samples` x `budget.seq_len` calibration tokens:

- one table per calibration window (each cached under --out/cache), and their means as the tables
  of 1, 2, 4, ... windows (`amq.bench.sensitivity_agreement.mean_table`: the metric is a mean per
  token), which gives disjoint replicates of every cheaper table for the cost of the reference;
- one-window tables on the first `--short` tokens of the first `--short-windows` windows (a
  shorter sensitivity window, not a setting of amq today: probes use `budget.seq_len`);
- per table: Kendall tau and Spearman of the per-linear damage against the reference's, the
  linears the configured pruning rule pins and their Jaccard index with the reference's, and the
  knapsack allocation at each target in the full space (as scripts/bench_quality.py builds it),
  truly evaluated on all the calibration windows: one common metric for every table.

    python scripts/bench_sensitivity.py budget=standard num_threads=1 --out /tmp/bench_sens/w348 --heldout 8
    python scripts/bench_sensitivity.py budget=standard num_threads=1 search.bits=[2,3,4] search.targets=[3.0,3.5,4.0] \\
        search.bits_window=null --out /tmp/bench_sens/w234 --short 64
    python scripts/bench_sensitivity.py budget=smoke --out /tmp/bench_sens/smoke --windows 1 --short 32   # quick look

Hydra overrides go before the options (--short and --batched take lists).

`--heldout 8` also evaluates the allocations on 8 windows of held-out text (the reference table was
measured on the calibration windows themselves, the cheaper ones on part of them).
`--batched 4` also measures the first 4 windows in one table as the search does (budget=standard's
sensitivity stage), for its seconds and to check the mean of one-window tables against it.
Results go to --out (results.json, results.md); rerunning with the same --out reuses the tables.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from bench_quality import evaluate_distinct
from omegaconf import DictConfig

from amq.bench.script_args import script_parser
from amq.bench.sensitivity_agreement import jaccard, mean_table, rank_agreement, replicate_windows, spread
from amq.bench.token_cost import sensitivity_probes
from amq.config import compose as amq_compose
from amq.config.compose import SearchPlan, Workbench, build, compose_config, evaluation_context, prepare, prune
from amq.data.tokens import CalibrationSpec, calibration_windows
from amq.devices import cpu_features
from amq.io import atomic_write_json, atomic_write_text
from amq.metrics.base import QualityMetric
from amq.search.eval_cache import with_cache
from amq.search.evaluator import ProxyEvaluator
from amq.search.knapsack import knapsack_allocations
from amq.search.seeding import additive_damage, width_factors
from amq.search.sensitivity import SensitivityTable
from amq.search.space import SearchSpace

log = logging.getLogger("amq.bench_sensitivity")


@dataclasses.dataclass
class Tables:
    """Measures and caches one-window sensitivity tables (window index, tokens) outside the user's cache."""

    cfg: DictConfig
    plan: SearchPlan
    wb: Workbench
    cache_dir: Path

    def one(self, window: int, seq_len: int) -> SensitivityTable:
        """The table of one calibration window's first `seq_len` tokens, as the sensitivity stage measures it."""
        metric = self.metric(self.wb.tokens[window : window + 1, :seq_len].contiguous())
        one = dataclasses.replace(self.wb, metric=metric, cache_dir=self.cache_dir)
        table, _ = prune(one, self.plan.pruning, 1, self.plan.share_groups, self.plan.expert_genes)
        return table

    def metric(self, tokens: torch.Tensor) -> QualityMetric:
        """The configured metric on `tokens`, its reference from the unquantized model."""
        wb = self.wb
        wb.bank.restore()  # the reference distributions come from the unquantized weights
        metric = build(self.cfg.metric, "metric", model=wb.lm.model, tokens=tokens)
        if hasattr(metric, "reuse_prefix"):  # passes start at the first changed block, as in a search
            metric.reuse_prefix(wb.lm.model.get_submodule(wb.layout.blocks_name))
        return metric

    def batched(self, n_windows: int) -> SensitivityTable:
        """The first `n_windows` windows in one table, exactly as a search with sensitivity_samples=n_windows."""
        table, _ = prune(dataclasses.replace(self.wb, cache_dir=self.cache_dir), self.plan.pruning, n_windows, self.plan.share_groups, self.plan.expert_genes)
        return table


def allocations(space: SearchSpace, table: SensitivityTable, uniform_metric: dict[int, float], targets: Sequence[float]) -> np.ndarray:
    """The knapsack allocation at each target from `table`, width factors from the uniform configurations."""
    factors = width_factors(space, uniform_metric, table.damage)
    return knapsack_allocations(space, additive_damage(space, table.damage, factors), targets)


def table_row(table: SensitivityTable, reference: SensitivityTable, pinned_ref: list[str], plan: SearchPlan) -> dict:
    """Ranking and pruning agreement of one table with the reference."""
    pinned = plan.pruning.pruned(table)
    return {
        "seconds": round(table.seconds, 2),
        "baseline": table.baseline,
        "median_damage": float(np.median(list(table.damage.values()))),
        **rank_agreement(table.damage, reference.damage),
        "n_pinned": len(pinned),
        "jaccard": jaccard(pinned, pinned_ref),
        "pinned": pinned,
    }


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def markdown_table(res: dict, targets: Sequence[float], jsd: str = "jsd") -> str:
    """One row per table setting, cheapest first, then the reference; mean ± std over disjoint replicates.

    `jsd`: which evaluation of the allocations (`jsd`: calibration windows, `heldout_jsd`)."""
    ts = [f"{t:g}" for t in targets]
    head = ["sensitivity tokens", "tables", "probe tokens (x ref)", "probe s / table (x ref)", "Kendall τ", "Spearman", "pinned", "Jaccard"]
    head += [f"{'held-out ' if jsd != 'jsd' else ''}JSD @ {t} (vs ref; worst)" for t in ts]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    ref = res["reference"]

    def pm(s: dict, fmt: str) -> str:
        return format(s["mean"], fmt) if s["std"] == 0 else f"{format(s['mean'], fmt)} ± {format(s['std'], fmt)}"

    for name, v in sorted(res["variants"].items(), key=lambda kv: kv[1]["probe_tokens"]):
        s = v["summary"]
        cells = [
            name,
            str(len(v["replicates"])),
            f"{v['probe_tokens']:,} ({v['token_ratio']:.3f})",
            f"{s['seconds']['mean']:.0f} ({s['seconds']['mean'] / ref['seconds']:.2f})",
            pm(s["kendall_tau"], ".3f"),
            pm(s["spearman"], ".3f"),
            pm(s["n_pinned"], ".1f"),
            pm(s["jaccard"], ".2f"),
        ]
        for t in ts:
            j, r = s[jsd][t], s[f"{jsd}_ratio"][t]
            cells.append(f"{j['mean']:.4g} ({_pct(r['mean'] - 1)}; {_pct(r['max'] - 1)})")
        lines.append("| " + " | ".join(cells) + " |")
    cells = [f"{ref['name']} (reference)", "1", f"{ref['probe_tokens']:,} (1)", f"{ref['seconds']:.0f} (1)", "1", "1", str(ref["n_pinned"]), "1"]
    cells += [f"{ref['allocations'][t][jsd]:.4g}" for t in ts]
    lines.append("| " + " | ".join(cells) + " |")
    uniform = ", ".join(f"{b}-bit {j:.4g}" for b, j in res["uniform" if jsd == "jsd" else "uniform_heldout"].items())
    return "\n".join(lines) + f"\n\nuniform configurations (same metric): {uniform}\n"


def cpu_record(wb: Workbench) -> dict:
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")), platform.processor())
    return {"cpu": model, "capability": cpu_features()["capability"], "threads": torch.get_num_threads(), "dtype": str(wb.lm.model.dtype)}


def main() -> None:
    ap = script_parser(__doc__, "Hydra overrides of conf/train_search.yaml")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_sens"))
    ap.add_argument("--windows", type=int, nargs="+", default=[1, 2, 4], help="windows per cheaper table (at budget.seq_len)")
    ap.add_argument("--short", type=int, nargs="*", default=[64, 128], help="tokens of the shorter one-window tables")
    ap.add_argument("--short-windows", type=int, default=4, help="how many windows the shorter tables are measured on (replicates)")
    ap.add_argument("--heldout", type=int, default=0, help="also evaluate the allocations on this many held-out windows of budget.seq_len")
    ap.add_argument("--batched", type=int, nargs="*", default=[], help="also measure the first N windows in one table, as the search does")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    cfg = compose_config(["logger=none", "finalize.enabled=false", *args.overrides])
    plan = amq_compose.plan(cfg)
    wb = prepare(cfg)
    n, seq_len = (int(x) for x in wb.tokens.shape)
    for k in args.windows:
        replicate_windows(n, k)  # refuses a count the calibration windows cannot hold, before measuring
    if any(not 8 <= s < seq_len for s in args.short) or not 1 <= args.short_windows <= n:
        ap.error(f"--short must lie in [8, {seq_len}) and --short-windows in [1, {n}]")
    tables = Tables(cfg, plan, wb, args.out / "cache")
    t0 = time.perf_counter()
    per_window = [tables.one(i, seq_len) for i in range(n)]  # the reference first: every window-count table comes from it
    short = {s: [tables.one(i, s) for i in range(args.short_windows)] for s in args.short}
    log.info("sensitivity tables: %.0fs", time.perf_counter() - t0)

    reference = mean_table(per_window)
    pinned_ref = plan.pruning.pruned(reference)
    candidates: dict[str, list[tuple[list[int], SensitivityTable]]] = {
        f"{k} x {seq_len}": [(w, mean_table([per_window[i] for i in w])) for w in replicate_windows(n, k)] for k in args.windows if k < n
    }
    candidates.update({f"1 x {s}": [([i], t) for i, t in enumerate(one)] for s, one in short.items()})

    # (c) knapsack allocations from every table, truly evaluated on all calibration windows
    space = SearchSpace(wb.layout.linears, wb.bits, wb.bank.quantizer.group_size, share_patterns=plan.share_groups, expert_genes=plan.expert_genes)
    evaluate = with_cache(ProxyEvaluator(wb.bank, wb.metric, space), plan.eval_cache, evaluation_context(wb), space)
    uniform = evaluate_distinct(space, evaluate, np.stack([space.uniform(b) for b in wb.bits]))
    uniform_metric = {b: float(m) for b, m in zip(wb.bits, uniform.metric)}
    ts = [f"{t:g}" for t in wb.targets]
    alloc = {"ref": allocations(space, reference, uniform_metric, wb.targets)}
    for name, reps in candidates.items():
        for r, (_, table) in enumerate(reps):
            alloc[f"{name}#{r}"] = allocations(space, table, uniform_metric, wb.targets)
    t0 = time.perf_counter()
    ev = evaluate_distinct(space, evaluate, np.concatenate(list(alloc.values())))
    log.info("%d distinct allocations evaluated in %.0fs", len(ev.configs), time.perf_counter() - t0)
    scores = {"jsd": {space.key(space.from_bits(c)): float(m) for c, m in zip(ev.configs, ev.metric)}}
    heldout_record, uniform_heldout = None, {}
    if args.heldout:
        t0 = time.perf_counter()
        text = next(iter(wb.splits.heldout))
        spec = CalibrationSpec(args.heldout, seq_len, seed=int(cfg.data_seed))
        tokens = calibration_windows(wb.lm.tokenizer, wb.splits.heldout[text], spec, wb.lm.add_bos, wb.cache_dir)
        heldout = tables.metric(tokens)
        evaluate = with_cache(ProxyEvaluator(wb.bank, heldout, space), plan.eval_cache, evaluation_context(wb, heldout), space)
        ev = evaluate_distinct(space, evaluate, np.stack([*(space.uniform(b) for b in wb.bits), *(space.from_bits(c) for c in ev.configs)]))
        scores["heldout_jsd"] = {space.key(space.from_bits(c)): float(m) for c, m in zip(ev.configs, ev.metric)}
        uniform_heldout = {b: scores["heldout_jsd"][space.key(space.uniform(b))] for b in wb.bits}
        heldout_record = f"{heldout.description} ({text})"
        log.info("held-out evaluations (%s, %d x %d tokens) in %.0fs", text, args.heldout, seq_len, time.perf_counter() - t0)

    def alloc_rows(key: str) -> dict[str, dict]:
        rows = {}
        for t, g, g_ref in zip(ts, alloc[key], alloc["ref"]):
            changed = int(sum(a != b for a, b in zip(space.to_bits(g).values(), space.to_bits(g_ref).values())))
            rows[t] = {"avg_bits": float(space.avg_bits(g[None])[0]), "linears_changed": changed}
            for name, values in scores.items():
                rows[t] |= {name: values[space.key(g)], f"{name}_ratio": values[space.key(g)] / values[space.key(g_ref)]}
        return rows

    probes = sensitivity_probes(reference)
    ref_tokens = probes * n * seq_len
    res: dict = {
        "protocol": {
            "model": wb.lm.name,
            "overrides": args.overrides,
            "bits": wb.bits,
            "targets": wb.targets,
            "calibration": wb.metric.description,
            "heldout": heldout_record,
            "pruning": dataclasses.asdict(plan.pruning),
            "machine": cpu_record(wb),
            "note": "window-count tables are means of one-window tables (their seconds: the sum); allocations in the full space",
        },
        "uniform": uniform_metric,
        "uniform_heldout": uniform_heldout,
        "reference": {
            "name": f"{n} x {seq_len}",
            "probe_tokens": ref_tokens,
            **table_row(reference, reference, pinned_ref, plan),
            "allocations": alloc_rows("ref"),
        },
        "variants": {},
    }
    for name, reps in candidates.items():
        k, s = (int(x) for x in name.split(" x "))
        rows = [{"windows": w, **table_row(t, reference, pinned_ref, plan), "allocations": alloc_rows(f"{name}#{r}")} for r, (w, t) in enumerate(reps)]
        summary = {key: spread([row[key] for row in rows]) for key in ("seconds", "kendall_tau", "spearman", "n_pinned", "jaccard")}
        for key in ("linears_changed", *scores, *(f"{m}_ratio" for m in scores)):
            summary[key] = {t: spread([row["allocations"][t][key] for row in rows]) for t in ts}
        res["variants"][name] = {"probe_tokens": probes * k * s, "token_ratio": probes * k * s / ref_tokens, "replicates": rows, "summary": summary}
    for k in args.batched:
        table = tables.batched(k)
        mean = mean_table(per_window[:k])
        res.setdefault("batched", {})[f"{k} x {seq_len}"] = {
            "seconds": round(table.seconds, 2),
            "mean_of_one_window_seconds": round(mean.seconds, 2),
            "max_abs_damage_difference": max(abs(table.damage[x] - mean.damage[x]) for x in table.damage),
            "median_damage": float(np.median(list(table.damage.values()))),
            **rank_agreement(table.damage, mean.damage),
        }
    atomic_write_json(args.out / "results.json", res)
    md = markdown_table(res, wb.targets)
    if args.heldout:
        md += "\n" + markdown_table(res, wb.targets, "heldout_jsd")
    atomic_write_text(args.out / "results.md", md)
    print(md)


if __name__ == "__main__":
    main()
