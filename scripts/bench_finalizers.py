"""Final quantizers compared at uniform bits: held-out perplexity, calibration time and packed bytes.

For every finalizer (HQQ, GPTQ, AWQ) and every width, all decoder linears of the configured model
(default: embedded SmolLM2, group 64) are quantized for real, swapped for packed layers, and the
packed model's perplexity is measured on the held-out splits. Plain round-to-nearest (min-max
groups) and the unquantized model are measured too, as references.

    python scripts/bench_finalizers.py num_threads=1
    python scripts/bench_finalizers.py --bits 3 4 --calib-samples 16 --json finalizers.json

Calibration windows come from the calibration split only (`amq.data.tokens.calibration_windows`);
perplexity from the held-out split (`amq.evaluation.perplexity`).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from amq.bench.script_args import script_parser
from amq.bits import average_bits
from amq.config.compose import build, quiet_libraries
from amq.data.corpora import keep_parsed
from amq.data.tokens import CalibrationSpec, calibration_windows
from amq.evaluation.perplexity import PerplexityProtocol, perplexity, perplexity_windows
from amq.modeling.discovery import discover_layout
from amq.quantizers.grid import rtn_quant
from amq.quantizers.packed import packed_bytes, replace_linears

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("bench_finalizers")
FINALIZERS = ("hqq", "gptq", "awq")
# name -> (finalizer, its overrides); "-intzero": whole-code zero points (what a bit-packed checkpoint holds)
VARIANTS = {"awq-unfolded": ("awq", ["finalizer.fold=false"])} | {f"{f}-intzero": (f, ["finalizer.integer_zero=true"]) for f in FINALIZERS}


def main() -> None:
    ap = script_parser(__doc__, "Hydra overrides, e.g. num_threads=1 model=gemma3_270m")
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    ap.add_argument(
        "--finalizers",
        nargs="+",
        default=list(FINALIZERS),
        choices=[*FINALIZERS, *VARIANTS],
        help="awq-unfolded: AWQ with a free scale per linear; <name>-intzero: whole-code zero points",
    )
    ap.add_argument("--calib-samples", type=int, default=16, help="calibration windows for GPTQ / AWQ")
    ap.add_argument("--calib-len", type=int, default=256, help="tokens per calibration window")
    ap.add_argument("--window", type=int, default=512, help="perplexity window (tokens)")
    ap.add_argument("--max-windows", type=int, default=32, help="perplexity windows per held-out text")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    quiet_libraries()

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train_search", overrides=["logger=none", *args.overrides])
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    torch.manual_seed(int(cfg.seed))
    lm = build(cfg.model.source, "model").load(Path(cfg.paths.cache_dir))
    model, layout, group = lm.model, discover_layout(lm.model), int(cfg.quantizer.group_size)
    splits = keep_parsed(build(cfg.data, "data"), cfg.paths.cache_dir).load()
    calib = calibration_windows(lm.tokenizer, splits.calibration, CalibrationSpec(args.calib_samples, args.calib_len, int(cfg.data_seed)), lm.add_bos)
    protocol = PerplexityProtocol(args.window, args.max_windows, lm.add_bos).fit_to(model)
    heldout = {name: perplexity_windows(lm.tokenizer, docs, protocol) for name, docs in splits.heldout.items()}
    bf16_bytes = sum(model.get_submodule(n).weight.numel() * model.get_submodule(n).weight.element_size() for n in layout.names)

    def ppl(m: torch.nn.Module, label: str) -> dict[str, float]:
        return {name: round(perplexity(m, w, f"{label} {name}")["perplexity"], 3) for name, w in heldout.items()}

    rows = [{"method": "unquantized", "bits": str(model.dtype).replace("torch.", ""), "ppl": ppl(model, "unquantized"), "bytes": bf16_bytes}]
    log.info("%s", rows[-1])
    for b in args.bits:
        bits = {n: b for n in layout.names}
        runs: list[tuple[str, callable]] = [("rtn", lambda bits=bits: {n: rtn_quant(model.get_submodule(n).weight, bits[n], group) for n in bits})]
        for name in args.finalizers:
            base, extra = VARIANTS.get(name, (name, []))
            with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
                fcfg = compose(config_name="train_search", overrides=["logger=none", *args.overrides, f"finalizer={base}", *extra]).finalizer
            fz = build(fcfg, "finalizer")
            runs.append((name, lambda fz=fz, bits=bits: fz.quantize(model, layout, bits, group, calib if fz.needs_calibration else None)))
        for name, run in runs:
            t0, c0 = time.perf_counter(), time.process_time()
            quants = run()
            seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
            qmodel = copy.deepcopy(model)
            replace_linears(qmodel, quants, model.dtype)
            rows.append(
                {
                    "method": name,
                    "bits": b,
                    "avg_bits_with_meta": average_bits(bits, layout.numels, group),
                    "ppl": ppl(qmodel, f"{name} {b}-bit"),
                    "quantize_s": round(seconds, 1),
                    "quantize_cpu_s": round(cpu_seconds, 1),
                    "bytes": packed_bytes(qmodel),
                }
            )
            log.info("%s", rows[-1])
            del qmodel, quants

    res = {
        "model": lm.name,
        "group_size": group,
        "linears": len(layout.names),
        "threads": torch.get_num_threads(),
        "calibration": {"windows": args.calib_samples, "tokens": args.calib_len, "split": "calibration", "data_seed": int(cfg.data_seed)},
        "perplexity_protocol": {**protocol.describe(), "data": splits.description},
        "bits_convention": "avg_bits_with_meta: searchable linears, weights + fp16 scale and zero per group",
        "bytes": "packed codes + fp16 scale/zero (+ AWQ input scales) of the decoder linears; unquantized: their bf16 weights",
        "rows": rows,
    }
    names = list(heldout)
    print("| method | bits | " + " | ".join(f"ppl {n}" for n in names) + " | quantize s (wall / CPU) | MiB |")
    print("| --- | --- | " + " | ".join("---" for _ in names) + " | --- | --- |")
    for r in rows:
        secs = f"{r['quantize_s']} / {r['quantize_cpu_s']}" if "quantize_s" in r else ""
        print(f"| {r['method']} | {r['bits']} | " + " | ".join(f"{r['ppl'][n]:.2f}" for n in names) + f" | {secs} | {r['bytes'] / 2**20:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
