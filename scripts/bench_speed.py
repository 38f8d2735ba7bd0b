"""Speed benchmark of the search's stages on the configured model (default: embedded SmolLM2, demo budget).

Reports proxy build time and memory, time per true evaluation next to the unquantized forward
pass over the same calibration tokens (the floor), eager against compiled divergence arithmetic,
sensitivity time, predictor fit time, NSGA-II time per iteration, and peak memory.

    python scripts/bench_speed.py                       # defaults (conf/, budget=demo)
    python scripts/bench_speed.py budget.n_samples=16 --repeats 5 --json out.json

Any Hydra override of conf/train_search.yaml may be given. Absolute times are only meaningful on
a quiet machine; the ratios are what to compare.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from amq.metrics.divergence import OutputDivergence  # noqa: E402
from amq.pipeline import build, prepare  # noqa: E402
from amq.search.space import SearchSpace  # noqa: E402
from amq.timing import (  # noqa: E402
    forward_floor_seconds,
    search_step_seconds,
    sensitivity_seconds_per_linear,
    swap_seconds,
    synchronizer,
    true_eval_seconds,
)

log = logging.getLogger("bench_speed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. budget=smoke model=gemma3_270m")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sensitivity-linears", type=int, default=20, help="linears timed for the sensitivity estimate")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train_search", overrides=["logger=none", *args.overrides])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    res: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else f"cpu x{torch.get_num_threads()} threads", "overrides": args.overrides}

    wb = prepare(cfg)
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
    per = sensitivity_seconds_per_linear(bank, sens, layout.names[: args.sensitivity_linears], wb.bits[0], wb.bits[-1], sync)
    res["sensitivity_s"] = {"per_linear": per, "all_linears_estimate": per * len(layout.names)}

    # predictor fit and NSGA-II on a realistic archive size
    n_archive = int(cfg.budget.n_initial_random) + 3 + int(cfg.budget.batch_size) * int(cfg.budget.iterations)
    step = search_step_seconds(space, build(cfg.predictor, "predictor"), build(cfg.search.nsga, "search"), n_archive)
    res["predictor_fit_s"] = {"n_points": n_archive, "seconds": step["fit_s"]}
    res["nsga_s_per_iteration"] = step["nsga_s"]

    if device == "cuda":
        res["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    text = json.dumps(res, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
