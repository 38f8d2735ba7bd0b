"""Search quality against baselines at equal true evaluations, on the configured model.

For each seed: run the AMQ search (as `amq-search` would, outputs under --out), then spend the
same number of true evaluations on random configurations, and evaluate the uniform
configurations. Report, per method, the best calibration JSD at or under each target (average bits
with scale/zero) and the hypervolume, all normalised the same way.

    python scripts/bench_quality.py                              # demo budget, seeds 0 1 2
    python scripts/bench_quality.py budget=smoke --seeds 0       # quick look

Any Hydra override of conf/train_search.yaml may be given.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from amq.io import read_jsonl  # noqa: E402
from amq.pipeline import prepare  # noqa: E402
from amq.search.evaluator import ProxyEvaluator  # noqa: E402
from amq.search.pareto import best_under_target, normalized_hypervolume  # noqa: E402
from amq.search.space import SearchSpace  # noqa: E402
from amq.train_search import run  # noqa: E402

log = logging.getLogger("bench_quality")


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train_search", overrides=overrides)


def _summarise(bits: np.ndarray, jsd: np.ndarray, targets: list[float], scale: float, brange: tuple[float, float]) -> dict:
    out = {"hypervolume": normalized_hypervolume(jsd, bits, scale, brange), "n": int(len(jsd))}
    for t in targets:
        i = best_under_target(jsd, bits, t)
        out[f"jsd@{t:g}"] = None if i is None else float(jsd[i])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_quality")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    results: dict[str, list[dict]] = {}
    for seed in args.seeds:
        run_dir = args.out / time.strftime("%Y%m%d-%H%M%S") / f"seed{seed}"
        cfg = _compose(["logger=none", f"seed={seed}", f"paths.output_dir={run_dir}", *args.overrides])
        t0 = time.perf_counter()
        run(cfg)
        search_s = time.perf_counter() - t0
        archive = list(read_jsonl(run_dir / "archive.jsonl"))
        a_bits = np.array([r["avg_bits"] for r in archive])
        a_jsd = np.array([r["metrics"]["jsd"] for r in archive])

        wb = prepare(cfg)
        full = SearchSpace(wb.layout.linears, wb.bits, wb.bank.quantizer.group_size)
        evaluate = ProxyEvaluator(wb.bank, wb.metric, full)
        window = tuple(cfg.search.bits_window) if cfg.search.bits_window else None
        brange = window or full.bits_range()
        u_bits, u_jsd = [], []
        for b in wb.bits:
            g = full.uniform(b)
            u_bits.append(full.avg_bits(g))
            u_jsd.append(evaluate(g).value)
        scale = u_jsd[0]  # all-lowest: the common normalisation of every method's hypervolume
        rng = np.random.default_rng(10_000 + seed)
        r_genes = full.random(rng, len(archive), window)
        t0 = time.perf_counter()
        r_jsd = np.array([evaluate(g).value for g in r_genes])
        random_s = time.perf_counter() - t0
        rows = {
            "amq": {**_summarise(a_bits, a_jsd, wb.targets, scale, brange), "seconds": search_s},
            "uniform": {**_summarise(np.array(u_bits), np.array(u_jsd), wb.targets, scale, brange), "seconds": None,
                        **{f"uniform{b}": {"avg_bits": float(x), "jsd": float(y)} for b, x, y in zip(wb.bits, u_bits, u_jsd)}},
            "random": {**_summarise(full.avg_bits(r_genes), r_jsd, wb.targets, scale, brange), "seconds": random_s},
        }
        # the front at each uniform configuration's own bits: equal-bits comparison
        for b, x, y in zip(wb.bits, u_bits, u_jsd):
            i = best_under_target(a_jsd, a_bits, x)
            j = best_under_target(r_jsd, full.avg_bits(r_genes), x)
            rows["amq"][f"jsd@uniform{b}"] = None if i is None else float(a_jsd[i])
            rows["random"][f"jsd@uniform{b}"] = None if j is None else float(r_jsd[j])
            rows["uniform"][f"jsd@uniform{b}"] = float(y)
        for k, v in rows.items():
            results.setdefault(k, []).append(v)
        log.info("seed %d: %s", seed, json.dumps(rows, default=str))

    keys = [k for k in results["amq"][0] if k.startswith("jsd@") or k == "hypervolume"]
    print(f"| method | {' | '.join(keys)} |")
    print("|---" * (len(keys) + 1) + "|")
    for method, rows in results.items():
        cells = []
        for k in keys:
            vals = [r[k] for r in rows if r.get(k) is not None]
            if not vals:
                cells.append("-")
            elif len(vals) == 1:
                cells.append(f"{vals[0]:.4g}")
            else:
                cells.append(f"{statistics.mean(vals):.4g} ± {statistics.stdev(vals):.2g}")
        print(f"| {method} | {' | '.join(cells)} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
