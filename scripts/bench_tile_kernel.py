#!/usr/bin/env python
"""Products of 2 to 16 rows (batched decoding) on one GPU: amq's CUDA tile kernel
(`amq.runtime.cuda_mma`) against its Triton tile kernel and bf16 cuBLAS, on the three Llama-2-7B
linear shapes (and q/k/v and gate/up stacked into one layer, as the runtime serves them), group 128,
each width of the CUDA kernel.

Same protocol as `bench_serving.py`'s per-layer products (random codes with fractional zero points,
each candidate checked against the float32 product of amq's dequantized weight, then timed as the
median replay of one CUDA graph over 256 MB of distinct layers, more than L2). `--splits` also times
the CUDA kernel at these K-slice counts beside the one `split_for` picks; `--variant` times kernels
built from other .cu files (the same entry point) beside the shipped one, on the same layers (at the
`--splits` counts too). docs/benchmarks.md, "The CUDA tile kernel", has the numbers.

    python3 scripts/bench_tile_kernel.py [--rows 16 8 2] [--widths 2 3 4] [--splits 1 2 4 8] [--shapes gate/up down q/k/v/o 'gate/up stacked' 'q/k/v stacked'] [--variant FILE.cu ...] [--json $OUT/bench_tile_kernel.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serving import SHAPES, graph_time, packed_layer, rel_err, triton_tiles  # noqa: E402

from amq.runtime import PlanesLinear, cuda_mma  # noqa: E402
from amq.runtime.layout import TILE_ROWS_MAX  # noqa: E402

log = logging.getLogger("bench_tile_kernel")
# the unstacked Llama-2-7B shapes, and q/k/v and gate/up stacked into one layer each (amq.runtime.fuse)
_QKV, _GATE = SHAPES["q/k/v/o"], SHAPES["gate/up"]
TILE_SHAPES = {**SHAPES, "q/k/v stacked": (3 * _QKV[0], _QKV[1]), "gate/up stacked": (2 * _GATE[0], _GATE[1])}


def bench_shape(name: str, out_f: int, in_f: int, args: argparse.Namespace, gen: torch.Generator) -> list[dict]:
    rows = []
    n_dense = max(2, math.ceil(args.cold_bytes / (out_f * in_f * 2)))
    dense = [torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02 for _ in range(n_dense)]
    xs = {m: torch.randn(m, in_f, device="cuda", dtype=torch.bfloat16, generator=gen) for m in args.rows}
    bf16_us = {m: graph_time(lambda x=x: [F.linear(x, w) for w in dense]) / n_dense * 1e6 for m, x in xs.items()}
    dense.clear()
    # one workspace big enough for the largest split measured (the model's holds SPLIT_MAX slices)
    wide = (torch.zeros(max(args.splits, default=1) * TILE_ROWS_MAX * out_f, device="cuda"), torch.zeros(-(-out_f // 8), dtype=torch.int32, device="cuda"))
    for bits in args.widths:
        n = max(2, math.ceil(args.cold_bytes / (out_f * in_f * bits / 8)))
        layers = [PlanesLinear(packed_layer(out_f, in_f, bits, 128, gen)) for _ in range(n)]
        ref_w = layers[0].weight_float()
        for m, x in xs.items():
            ref = x.float() @ ref_w.t()
            row = {"shape": name, "bits": bits, "rows": m, "bf16_us": bf16_us[m]}

            def cuda(layer: PlanesLinear, split: int | None = None, source: Path = cuda_mma.SOURCE, x: torch.Tensor = x) -> torch.Tensor | None:
                workspace = (layer.split_partial, layer.split_count) if split is None else wide
                return cuda_mma.mma(x, layer.planes(), layer.scale, layer.zero, bits, 128, layer.tile, out_f, workspace, split=split, source=source)

            variants = [("triton", lambda layer, x=x: triton_tiles(layer, x))]
            # the shipped kernel, then each variant; each at split_for's split, then at each of --splits
            for v in [cuda_mma.SOURCE, *args.variant]:
                name_v = "cuda" if v == cuda_mma.SOURCE else f"cuda_{v.stem}"
                variants += [(name_v + ("" if s is None else f"_split{s}"), lambda layer, v=v, s=s: cuda(layer, s, v)) for s in [None, *args.splits]]
            for label, fn in variants:
                y = fn(layers[0])
                if y is None:
                    log.warning("%s %d-bit: the CUDA tile kernel does not take this layer", name, bits)
                    continue
                row[f"{label}_err"] = rel_err(y, ref)
                row[f"{label}_us"] = graph_time(lambda fn=fn: [fn(layer) for layer in layers]) / n * 1e6
            log.info("%s", json.dumps({k: round(v, 5 if k.endswith("err") else 2) if isinstance(v, float) else v for k, v in row.items()}))
            rows.append(row)
        layers.clear()
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", nargs="+", type=int, default=list(cuda_mma.WIDTHS), choices=cuda_mma.WIDTHS)
    p.add_argument("--rows", nargs="+", type=int, default=[16, 8, 2], choices=range(2, TILE_ROWS_MAX + 1), metavar="ROWS")
    p.add_argument("--splits", nargs="*", type=int, default=[], help="also time the CUDA kernel at these K-slice counts")
    p.add_argument("--variant", nargs="*", type=Path, default=[], help="also time the kernel built from these .cu files (same entry point)")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(TILE_SHAPES))
    p.add_argument("--cold-bytes", type=float, default=256e6)
    p.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "bench_tile_kernel.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if any(s < 1 for s in args.splits):
        p.error("--splits: K-slice counts are 1 or more")
    missing = [str(v) for v in args.variant if not v.is_file()]
    if missing:
        p.error(f"--variant: no such .cu file: {', '.join(missing)}")
    if not torch.cuda.is_available():
        print("bench_tile_kernel needs a CUDA GPU", file=sys.stderr)
        return 2
    unbuilt = [str(s) for s in [cuda_mma.SOURCE, *args.variant] if not cuda_mma.available(torch.device("cuda"), s)]
    if unbuilt:
        print(f"the CUDA tile kernel could not be built here from {', '.join(unbuilt)} (see the warning above)", file=sys.stderr)
        return 2
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = [r for name, (o, i) in TILE_SHAPES.items() if name in args.shapes for r in bench_shape(name, o, i, args, gen)]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
