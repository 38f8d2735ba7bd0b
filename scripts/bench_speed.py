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
import statistics
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
from amq.search.nsga import PredictedQualityProblem, run_nsga2  # noqa: E402
from amq.search.space import SearchSpace  # noqa: E402

log = logging.getLogger("bench_speed")


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
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
    batches = list(torch.split(wb.tokens, int(cfg.metric.batch_size)))

    def forward_only() -> None:
        with torch.inference_mode():
            for ids in batches:
                model(input_ids=ids.to(model.device))
        sync()

    forward_only()
    floor = _median_time(forward_only, args.repeats)
    res["forward_floor_s"] = floor

    # true evaluation: swap a random configuration in, then the metric (eager and compiled)
    space = SearchSpace(layout.linears, wb.bits, bank.quantizer.group_size)
    rng = np.random.default_rng(0)
    configs = [space.to_bits(g) for g in space.random(rng, args.repeats + 1)]
    for label, compiled in (("eager", False), ("compiled", True)):
        bank.restore()
        metric = OutputDivergence(model, wb.tokens, kind=cfg.metric.kind, batch_size=int(cfg.metric.batch_size), compile=compiled)
        it = iter(configs)

        def one_eval() -> None:
            bank.apply(next(it))
            metric.evaluate(model)
            sync()

        one_eval()  # warm-up (and compilation)
        t = _median_time(one_eval, args.repeats)
        swap = _median_time(lambda: (bank.apply(configs[0]), bank.apply(configs[1]), sync()), args.repeats) / 2
        res[f"true_eval_{label}_s"] = t
        res[f"true_eval_{label}_ratio"] = t / floor
    res["swap_s"] = swap

    # sensitivity: per-linear cost measured on a few linears, extrapolated to all
    sens = wb.metric.subset(int(cfg.budget.sensitivity_samples))
    names = layout.names[: args.sensitivity_linears]
    hi, lo = wb.bits[-1], wb.bits[0]
    bank.apply({n: hi for n in layout.names})
    t0 = time.perf_counter()
    for n in names:
        bank.apply({n: lo})
        sens.evaluate(model)
        bank.apply({n: hi})
    per = (time.perf_counter() - t0) / len(names)
    res["sensitivity_s"] = {"per_linear": per, "all_linears_estimate": per * len(layout.names)}

    # predictor fit and NSGA-II on a realistic archive size
    make_predictor = build(cfg.predictor, "predictor")
    n_archive = int(cfg.budget.n_initial_random) + 3 + int(cfg.budget.batch_size) * int(cfg.budget.iterations)
    X = space.random(rng, n_archive)
    y = np.exp(-space.avg_bits(X)) * (1 + 0.1 * rng.random(len(X)))  # fit time does not depend on the values
    t0 = time.perf_counter()
    pred = make_predictor(seed=0).fit(space.features(X), y)
    res["predictor_fit_s"] = {"n_points": n_archive, "seconds": time.perf_counter() - t0}
    problem = PredictedQualityProblem(space, lambda g: pred.predict(space.features(g)))
    nsga = build(cfg.search.nsga, "search")
    t0 = time.perf_counter()
    run_nsga2(problem, nsga, X[:10], seed=0)
    res["nsga_s_per_iteration"] = time.perf_counter() - t0

    if device == "cuda":
        res["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    text = json.dumps(res, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
