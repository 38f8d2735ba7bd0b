"""Probing every width against the lowest only: what the sensitivity table's allocations give.

The search's initial design is knapsack allocations from the sensitivity table. With
`search.sensitivity_widths=lowest` (the AMQ reference) each linear is probed at the lowest width
only, and its damage at a wider width is that times one factor per width (fitted to the uniform
configurations); with `all` it is also probed at every width between the lowest and the highest,
and each width costs what was measured; with `estimated` those widths' damages are estimated from
one pass's output errors (amq.search.output_error). Per table size (--windows: sensitivity windows
per probe) and per rule (the lowest width, every width, estimated middle widths, every width with
the middle widths shrunk as `search.shrink_table` does), this script builds the knapsack allocation at each budget in the full space (as
scripts/bench_quality.py builds its knapsack baseline), truly evaluates it on the run's
calibration windows, and measures its held-out perplexity on every held-out text (wiki and the
Lee news corpus for the embedded data).

    python scripts/bench_probe_widths.py budget=standard num_threads=1 'search.bits=[2,3,4]' \\
        'search.targets=[3.0,3.5,4.0]' search.bits_window=null budget.n_samples=4 budget.seq_len=512 --windows 1 2 4
    python scripts/bench_probe_widths.py budget=standard num_threads=1 --windows 2 4     # SmolLM2's {3,4,8}
    python scripts/bench_probe_widths.py budget=smoke --windows 1 --ppl-windows 2 --ppl-window 128   # quick look

Hydra overrides go before the options. Tables are cached as the search caches them (AMQ_CACHE_DIR),
so a table a search measured is reused. Results: --out (results.json, results.md).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from amq.bench.heldout import HeldoutPerplexity
from amq.bench.script_args import script_parser
from amq.config import compose as amq_compose
from amq.config.compose import compose_config, prepare, prune
from amq.evaluation.perplexity import PerplexityProtocol
from amq.io import atomic_write_json, atomic_write_text
from amq.search.evaluator import ProxyEvaluator
from amq.search.knapsack import knapsack_allocations
from amq.search.seeding import additive_damage, width_factors
from amq.search.sensitivity import SENSITIVITY_WIDTHS
from amq.search.space import SearchSpace

ROOT = Path(__file__).resolve().parents[1]
# (search.sensitivity_widths, search.shrink_table) of each table compared
TABLES = [*((w, False) for w in SENSITIVITY_WIDTHS), ("all", True)]
log = logging.getLogger("amq.bench_probe_widths")


def markdown_table(rows: list[dict], budgets: list[float], texts: list[str], metric: str) -> str:
    head = ["table", "probes", "probe tokens (M)", *[f"{metric.upper()} @ {b:g}" for b in budgets]]
    head += [f"PPL {text} @ {b:g}" for text in texts for b in budgets]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["table"], str(r["probes"]), f"{r['probe_tokens'] / 1e6:.3f}", *[f"{a['calibration']:.4f}" for a in r["allocations"]]]
        cells += [f"{a['perplexity'][text]:.1f}" for text in texts for a in r["allocations"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = script_parser(__doc__, "Hydra overrides of conf/train_search.yaml")
    ap.add_argument("--windows", type=int, nargs="+", default=[1, 2], help="sensitivity windows per probe, one table pair each")
    ap.add_argument("--budgets", type=float, nargs="+", help="average bits of the allocations (default: the run's targets)")
    ap.add_argument("--ppl-window", type=int, default=512, help="held-out perplexity window (tokens)")
    ap.add_argument("--ppl-windows", type=int, default=16, help="held-out windows per text")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_probe_widths")
    args = ap.parse_args()
    if any(k < 1 for k in args.windows):
        ap.error(f"--windows {args.windows}: each is a count of calibration windows >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    overrides = ["logger=none", "eval_cache=none", "finalize.enabled=false", *args.overrides, f"paths.output_dir={args.out / 'run'}"]
    cfg = compose_config(overrides)
    plan = amq_compose.plan(cfg)
    wb = prepare(cfg)
    windows, length = wb.tokens.shape
    if max(args.windows) > windows:
        ap.error(f"--windows {max(args.windows)}: the run has {windows} calibration windows (budget.n_samples)")
    full = SearchSpace(wb.layout.linears, wb.bits, wb.bank.quantizer.group_size)
    budgets = args.budgets or list(wb.targets)

    evaluate = ProxyEvaluator(wb.bank, wb.metric, full)
    uniform = {b: evaluate(full.uniform(b)).value for b in wb.bits}
    ppl = HeldoutPerplexity(wb, PerplexityProtocol(args.ppl_window, args.ppl_windows, wb.lm.add_bos))
    rows = []
    for k in args.windows:
        for widths, shrink in TABLES:
            t0 = time.perf_counter()
            table, _ = prune(wb, plan.pruning, k, plan.share_groups, plan.expert_genes, widths, shrink)
            cost = additive_damage(full, table.damage, width_factors(full, uniform, table.damage), table.mid)
            allocations = []
            for budget, genes in zip(budgets, knapsack_allocations(full, cost, budgets), strict=True):
                bits = full.to_bits(genes)
                allocations.append({"budget": budget, "avg_bits": float(full.avg_bits(genes)), "calibration": evaluate(genes).value, "perplexity": ppl(bits)})
            rows.append(
                {
                    "table": f"{widths}{', shrunk' if shrink else ''} x {k} window{'s' if k > 1 else ''}",
                    "widths": widths,
                    "shrunk": shrink,
                    "windows": k,
                    "probes": table.probes,
                    "probe_tokens": table.probes * k * length + table.estimate_tokens,
                    "seconds": round(time.perf_counter() - t0, 1),
                    "allocations": allocations,
                }
            )
            log.info("%s: %s", rows[-1]["table"], allocations)
    result = {
        "model": wb.lm.name,
        "overrides": args.overrides,
        "calibration": wb.metric.description,
        "metric": wb.metric.name,
        "uniform": uniform,
        "perplexity": ppl.describe(),
        "unquantized_perplexity": ppl(None),
        "tables": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "results.json", result)
    md = markdown_table(rows, budgets, ppl.texts, wb.metric.name)
    atomic_write_text(args.out / "results.md", md + "\n")
    print(md)


if __name__ == "__main__":
    main()
