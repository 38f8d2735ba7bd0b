"""Zero-shot accuracy (lm-eval, offline BIG-bench tasks) of the unquantized model and uniform HQQ copies.

Shows whether a task has signal at this model size (accuracy against chance) and how much uniform
low-bit quantization costs on it. Wall and CPU seconds are both recorded: on a shared machine the
CPU time (with num_threads=1) is the figure that does not depend on the load. The uniform copies are the proxy's fake-quantized weights
(HQQ, the configured group size), swapped into the same model object.

    python scripts/bench_zeroshot.py                                  # social_iqa, bf16 + uniform 3/4-bit
    python scripts/bench_zeroshot.py --tasks bigbench_riddle_sense --bits 3 --limit 20 num_threads=2

Any Hydra override of conf/train_search.yaml may follow the options.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from amq.bits import meta_overhead
from amq.config.compose import prepare
from amq.evaluation.zeroshot import zero_shot

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("bench_zeroshot")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["bigbench_social_iqa"])
    parser.add_argument("--bits", nargs="*", type=int, default=[3, 4], help="uniform HQQ widths to evaluate too")
    parser.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    args, overrides = parser.parse_known_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train_search", overrides=["budget=smoke", "num_threads=1", *overrides])
    wb = prepare(cfg)
    missing = sorted(set(args.bits) - set(wb.bits))
    if missing:
        parser.error(f"--bits {missing} not in the proxy's widths {wb.bits} (override search.bits)")
    rows = []
    for nbits in [None, *args.bits]:
        wb.bank.apply({n: nbits for n in wb.layout.names})
        label = "bf16" if nbits is None else f"uniform {nbits}-bit HQQ g{wb.bank.quantizer.group_size}"
        t0, c0 = time.perf_counter(), time.process_time()
        res = zero_shot(wb.lm.model, wb.lm.tokenizer, args.tasks, wb.cache_dir, limit=args.limit, batch_size=args.batch_size, seed=int(cfg.seed))
        bits = None if nbits is None else nbits + meta_overhead(wb.bank.quantizer.group_size)
        rows.append(
            {
                "model": label,
                "avg_bits_with_meta": bits,
                "seconds": round(time.perf_counter() - t0, 1),
                "cpu_seconds": round(time.process_time() - c0, 1),
                "tasks": res,
            }
        )
        log.info("%s: %s", label, json.dumps(res))
    wb.bank.restore()
    report = {"model": wb.lm.name, "tasks": args.tasks, "limit": args.limit, "num_threads": int(cfg.num_threads), "rows": rows}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        from amq.io import atomic_write_text

        atomic_write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
