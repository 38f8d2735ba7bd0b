"""What makes the search fast on any CPU, measured side by side on the same tokens in one run.

1. The compute dtype: one forward pass of the model in bfloat16 and in float32 over the metric's
   calibration tokens (on a CPU without native bf16, bf16 matmuls are emulated).
2. Prefix reuse in the sensitivity stage: the stage's probes with every pass run in full, and with
   each pass starting at the probed block. Both give the same values; the script checks it.
3. Prefix reuse for search candidates: the initial design evaluated with and without it.

    python scripts/bench_cpu.py                                   # demo budget, every 5th linear
    python scripts/bench_cpu.py --every 1 --json cpu.json         # the whole sensitivity stage
    python scripts/bench_cpu.py budget.sensitivity_samples=4      # any Hydra override

It prints the CPU (torch's capability and the bf16 flags) with every number. Absolute times on a
shared machine are noisy; compare the ratios.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from amq.bench.script_args import script_parser
from amq.config.compose import prepare
from amq.devices import cpu_features, cpu_has_native_bf16
from amq.metrics.divergence import forward_logits
from amq.search import sensitivity
from amq.search.evaluator import ProxyEvaluator
from amq.search.space import SearchSpace

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("bench_cpu")


def forward_seconds(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int, repeats: int) -> float:
    """Best of `repeats` passes over all tokens, in the metric's batches."""
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            for ids in torch.split(tokens, batch_size):
                forward_logits(model, ids)
            best = min(best, time.perf_counter() - t0)
    return best


def without_reuse(metric):
    """The same metric with every pass run in full."""
    full = copy.copy(metric)
    full._prefix = None
    return full


def main() -> None:
    ap = script_parser(__doc__, "Hydra overrides, e.g. budget=smoke model=gemma3_270m")
    ap.add_argument("--every", type=int, default=5, help="probe every k-th linear in the sensitivity comparison (1: all)")
    ap.add_argument("--candidates", type=int, default=12, help="random candidates in the search comparison")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train_search", overrides=["logger=none", "finalize.enabled=false", *args.overrides])
    wb = prepare(cfg)
    feats = cpu_features()
    cpu = {
        "capability": feats["capability"],
        "native_bf16": cpu_has_native_bf16(),
        "flags": {k: bool(v) for k, v in feats["flags"].items() if k in ("avx2", "avx512_f", "avx512_bf16", "amx_bf16")},
        "threads": torch.get_num_threads(),
        "model_dtype": str(wb.lm.model.dtype),
    }
    log.info("CPU: %s", cpu)
    out: dict = {"cpu": cpu, "tokens": list(wb.metric.tokens.shape)}

    # 1. dtype: the same forward in bf16 and float32
    model = wb.lm.model
    secs = {}
    for dtype in (torch.float32, torch.bfloat16):
        secs[str(dtype)] = forward_seconds(copy.deepcopy(model).to(dtype), wb.metric.tokens, wb.metric.batch_size, args.repeats)
    out["forward_s"] = secs
    out["bf16_over_float32"] = secs["torch.bfloat16"] / secs["torch.float32"]
    log.info(
        "forward over %s tokens: bf16 %.2fs, float32 %.2fs (bf16 / float32 = %.2f)",
        tuple(wb.metric.tokens.shape),
        secs["torch.bfloat16"],
        secs["torch.float32"],
        out["bf16_over_float32"],
    )

    # 2. sensitivity probes, full passes against prefix reuse
    bank, names = wb.bank, wb.layout.names[:: args.every]
    sens = wb.metric.subset(int(cfg.budget.sensitivity_samples))
    tables, times = {}, {}
    for label, metric in (("full", without_reuse(sens)), ("prefix_reuse", sens)):
        t0 = time.perf_counter()
        tables[label] = sensitivity.measure(bank, metric, bank.bits[0], bank.bits[-1], names=names)
        times[label] = time.perf_counter() - t0
    same = tables["full"].damage == tables["prefix_reuse"].damage and tables["full"].baseline == tables["prefix_reuse"].baseline
    out["sensitivity"] = {
        "linears": len(names),
        "seconds": times,
        "reuse_over_full": times["prefix_reuse"] / times["full"],
        "identical_values": same,
        **sens.prefix_stats,
    }
    log.info(
        "sensitivity over %d linears: full %.1fs, prefix reuse %.1fs (ratio %.3f), identical values: %s",
        len(names),
        times["full"],
        times["prefix_reuse"],
        out["sensitivity"]["reuse_over_full"],
        same,
    )

    # 3. search candidates (random, as an initial design has them), full passes against prefix reuse
    space = SearchSpace(wb.layout.linears, wb.bits, wb.bank.quantizer.group_size)
    genes = space.random(np.random.default_rng(0), args.candidates)
    values, times = {}, {}
    for label, metric in (("full", without_reuse(wb.metric)), ("prefix_reuse", wb.metric)):
        bank.restore()
        evaluate = ProxyEvaluator(bank, metric, space)
        t0 = time.perf_counter()
        values[label] = [evaluate(g).value for g in genes]
        times[label] = time.perf_counter() - t0
    out["candidates"] = {
        "n": len(genes),
        "seconds": times,
        "reuse_over_full": times["prefix_reuse"] / times["full"],
        "identical_values": values["full"] == values["prefix_reuse"],
    }
    log.info(
        "%d random candidates: full %.1fs, prefix reuse %.1fs (ratio %.3f)",
        len(genes),
        times["full"],
        times["prefix_reuse"],
        out["candidates"]["reuse_over_full"],
    )

    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
