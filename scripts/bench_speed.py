"""Speed benchmark of the search's stages on the configured model (default: embedded SmolLM2, demo budget).

Reports proxy build time and memory, time per true evaluation next to the unquantized forward
pass over the same calibration tokens (the floor), eager against compiled divergence arithmetic,
sensitivity time, predictor fit time, NSGA-II time per iteration, and peak memory; then the
projected end-to-end time of a search at each budget preset (`--budgets`, amq.bench.cost_model) from
those costs, with the true evaluation and sensitivity costs scaled linearly in calibration tokens
and the predictor fit and NSGA-II measured at the preset's archive sizes (up to `--max-fit-size`).

    python scripts/bench_speed.py                       # defaults (conf/, budget=demo)
    python scripts/bench_speed.py budget.n_samples=16 --repeats 5 --json out.json
    python scripts/bench_speed.py model=gemma3_270m --budgets smoke demo

Any Hydra override of conf/train_search.yaml may be given. Absolute times are only meaningful on
a quiet machine; the ratios are what to compare.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from amq.bench.cost_model import MeasuredCurve, SearchWork, StageCosts, project
from amq.bench.script_args import script_parser
from amq.bench.timing import (
    forward_floor_seconds,
    search_step_seconds,
    sensitivity_seconds_per_linear,
    spread_linears,
    swap_seconds,
    synchronizer,
    true_eval_seconds,
)
from amq.config.compose import build, prepare
from amq.metrics.divergence import OutputDivergence
from amq.search.space import SearchSpace

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("bench_speed")


def main() -> None:
    ap = script_parser(__doc__, "Hydra overrides, e.g. budget=smoke model=gemma3_270m")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sensitivity-linears", type=int, default=20, help="linears timed for the sensitivity estimate")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--budgets", nargs="*", default=["smoke", "demo", "paper"], help="budget presets to project end to end")
    ap.add_argument("--max-fit-size", type=int, default=1000, help="largest archive the predictor fit is timed at (held constant beyond)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train_search", overrides=["logger=none", *args.overrides])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    wb = prepare(cfg)  # sets the thread count: describe the device after it
    res: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else f"cpu x{torch.get_num_threads()} threads", "overrides": args.overrides}
    model, bank, layout = wb.lm.model, wb.bank, wb.layout
    sync = synchronizer(device)
    res["model"] = wb.lm.name
    res["tokens"] = list(wb.tokens.shape)
    res["bf16_model_mb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20

    # proxy build, uncached
    per_bits = {}
    for b in wb.bits:
        t0 = time.perf_counter()
        bank.quantize_all(b)
        per_bits[b] = time.perf_counter() - t0
    res["proxy_build_s"] = {"per_width": per_bits, "total": sum(per_bits.values())}
    res["proxy_memory_mb"] = bank.memory_bytes() / 2**20

    # floor: the unquantized forward over the same calibration windows, same batching
    bank.restore()
    floor = forward_floor_seconds(model, wb.tokens, int(cfg.metric.batch_size), args.repeats, sync)
    res["forward_floor_s"] = floor

    # true evaluation: swap a random configuration in, then the metric (eager and compiled)
    space = SearchSpace(layout.linears, wb.bits, bank.quantizer.group_size)
    rng = np.random.default_rng(0)
    configs = [space.to_bits(g) for g in space.random(rng, args.repeats + 1)]
    for label, compiled in (("eager", False), ("compiled", True)):
        bank.restore()
        metric = OutputDivergence(model, wb.tokens, kind=cfg.metric.kind, batch_size=int(cfg.metric.batch_size), compile=compiled)
        t = true_eval_seconds(bank, metric, configs, args.repeats, sync)
        res[f"true_eval_{label}_s"] = t
        res[f"true_eval_{label}_ratio"] = t / floor
    res["swap_s"] = swap_seconds(bank, configs[0], configs[1], args.repeats, sync)

    # sensitivity: per-linear cost measured on a few linears, extrapolated to all
    sens = wb.metric.subset(int(cfg.budget.sensitivity_samples))
    per = sensitivity_seconds_per_linear(bank, sens, spread_linears(layout.names, args.sensitivity_linears), wb.bits[0], wb.bits[-1], sync)
    res["sensitivity_s"] = {"per_linear": per, "all_linears_estimate": per * len(layout.names)}

    # predictor fit and NSGA-II on a realistic archive size
    n_archive = int(cfg.budget.n_initial_random) + 3 + int(cfg.budget.batch_size) * int(cfg.budget.iterations)
    step = search_step_seconds(space, build(cfg.predictor, "predictor"), build(cfg.search.nsga, "search"), n_archive)
    res["predictor_fit_s"] = {"n_points": n_archive, "seconds": step["fit_s"]}
    res["nsga_s_per_iteration"] = step["nsga_s"]

    res["projection"] = {
        b: project_preset(
            b,
            args.overrides,
            res,
            space,
            len(layout.linears),
            len(wb.bits),
            int(wb.tokens.numel()),
            int(cfg.budget.sensitivity_samples) * int(cfg.budget.seq_len),
            args.max_fit_size,
        )
        for b in args.budgets
    }

    if device == "cuda":
        res["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    text = json.dumps(res, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


def project_preset(
    budget: str,
    overrides: list[str],
    res: dict,
    space: SearchSpace,
    n_linears: int,
    n_uniform: int,
    eval_tokens: int,
    sensitivity_tokens: int,
    max_fit: int,
) -> dict:
    """End-to-end seconds of a search at `budget`, from this run's measured stage costs.

    True evaluations and sensitivity scale with the preset's calibration tokens (linearly: the
    forward pass dominates both); the predictor fit and NSGA-II are measured at three of the
    preset's archive sizes with its own NSGA-II settings.
    """
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        pcfg = compose(config_name="train_search", overrides=["logger=none", *overrides, f"budget={budget}"])
    b = pcfg.budget
    work = SearchWork.from_budget(b, n_uniform, n_linears)
    sizes = work.archive_sizes() or [work.initial_design]
    timed = sorted({min(n, max_fit) for n in (sizes[0], sizes[len(sizes) // 2], sizes[-1])})
    steps = [search_step_seconds(space, build(pcfg.predictor, "predictor"), build(pcfg.search.nsga, "search"), n) for n in timed]
    tokens = int(b.n_samples) * int(b.seq_len)
    costs = StageCosts(
        proxy_build_s=res["proxy_build_s"]["total"],
        reference_s=res["forward_floor_s"] * tokens / eval_tokens,
        true_eval_s=res["true_eval_compiled_s" if pcfg.metric.compile else "true_eval_eager_s"] * tokens / eval_tokens,
        sensitivity_eval_s=res["sensitivity_s"]["per_linear"] * int(b.sensitivity_samples) * int(b.seq_len) / sensitivity_tokens,
        predictor_fit=MeasuredCurve.from_steps(steps, "fit_s"),
        nsga_iteration=MeasuredCurve.from_steps(steps, "nsga_s"),
    )
    log.info("projected %s budget: %d true evaluations of %d x %d tokens", budget, work.true_evaluations, int(b.n_samples), int(b.seq_len))
    return {"true_evaluations": work.true_evaluations, "calibration": [int(b.n_samples), int(b.seq_len)], "fit_timed_at": timed, **project(work, costs)}


if __name__ == "__main__":
    main()
