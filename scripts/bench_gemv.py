#!/usr/bin/env python
"""One-row products (batch-1 decoding) on one GPU: amq's CUDA GEMV against its Triton GEMV, torch's
int4 tinygemm (4 bits) and bf16 cuBLAS, on the three Llama-2-7B linear shapes, group 128.

Same protocol as `bench_serving.py`'s per-layer products (random codes with fractional zero points,
each candidate checked against the float32 product of amq's dequantized weight, then timed as the
median replay of one CUDA graph over 256 MB of distinct layers, more than L2). `--all-shapes` times
every block shape of the CUDA kernel (`amq.runtime.cuda_gemv.SHAPES`, from a separate build of all
of them) instead of the one `block_shape` picks for the width. `--variant` also times kernels built
from other .cu files with the same entry point (scripts/kernel_variants/gemv/), each at the width's
block shape, beside the shipped one. docs/benchmarks.md, "The CUDA GEMV", has the numbers.

    python3 scripts/bench_gemv.py [--widths 2 3 4 8] [--all-shapes] [--variant FILE.cu ...] [--json $OUT/bench_gemv.json]
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

from bench_serving import SHAPES, WIDTHS, graph_time, packed_layer, rel_err  # noqa: E402

from amq.runtime import PlanesLinear, TinyGemmLinear, cuda_gemv  # noqa: E402

log = logging.getLogger("bench_gemv")


def bench_shape(
    name: str, out_f: int, in_f: int, widths: list[int], all_shapes: bool, variants: list[Path], cold_bytes: float, gen: torch.Generator
) -> list[dict]:
    from amq.runtime import triton_kernels as tk  # needs Triton: imported on the GPU machine only

    rows = []
    n_dense = max(2, math.ceil(cold_bytes / (out_f * in_f * 2)))
    dense = [torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02 for _ in range(n_dense)]
    x = torch.randn(1, in_f, device="cuda", dtype=torch.bfloat16, generator=gen)
    bf16_us = graph_time(lambda: [F.linear(x, w) for w in dense]) / n_dense * 1e6
    dense.clear()
    for bits in widths:
        n = max(2, math.ceil(cold_bytes / (out_f * in_f * bits / 8)))
        packed = [packed_layer(out_f, in_f, bits, 128, gen) for _ in range(n)]
        layers = [PlanesLinear(p) for p in packed]
        tiny = [TinyGemmLinear(p) for p in packed] if bits == 4 else []
        packed.clear()
        ref = x.float() @ layers[0].weight_float().t()
        row = {"shape": name, "bits": bits, "bf16_us": bf16_us}

        def triton(layer: PlanesLinear) -> torch.Tensor:
            return tk.product(
                x, layer.planes(), layer.scale, layer.zero, bits, 128, layer.tile, out_f, (layer.split_partial, layer.split_count), cuda_gemv=False
            )

        row["triton_err"] = rel_err(triton(layers[0]), ref)
        row["triton_us"] = graph_time(lambda: [triton(m) for m in layers]) / n * 1e6
        # the build that serves (each width at its own shape), or a build of every shape; then each variant
        shapes = list(range(len(cuda_gemv.SHAPES))) if all_shapes else [None]
        runs = [(s, cuda_gemv.SOURCE) for s in shapes] + [(None, v) for v in variants]
        for s, source in runs:

            def cuda(layer: PlanesLinear, s: int | None = s, source: Path = source) -> torch.Tensor | None:
                return cuda_gemv.gemv(x, layer.planes(), layer.scale, layer.zero, bits, 128, layer.tile, out_f, shape=s, source=source)

            y = cuda(layers[0])
            if y is None:
                log.warning("%s %d-bit: the CUDA GEMV (%s) does not take this layer", name, bits, source.name)
                continue
            label = f"cuda{cuda_gemv.block_shape(bits) if s is None else s}"  # the shape index it ran
            label += "" if source == cuda_gemv.SOURCE else f"_{source.stem}"
            row[f"{label}_err"] = rel_err(y, ref)
            row[f"{label}_us"] = graph_time(lambda: [cuda(m) for m in layers]) / n * 1e6
        if tiny:
            row["tinygemm_err"] = rel_err(tiny[0](x), ref)
            row["tinygemm_us"] = graph_time(lambda: [m(x) for m in tiny]) / n * 1e6
        log.info("%s", json.dumps({k: round(v, 5 if k.endswith("err") else 2) if isinstance(v, float) else v for k, v in row.items()}))
        rows.append(row)
        layers.clear()
        tiny.clear()
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", nargs="+", type=int, default=list(WIDTHS), choices=WIDTHS)
    p.add_argument("--all-shapes", action="store_true", help="time every block shape of the CUDA kernel")
    p.add_argument("--variant", nargs="*", type=Path, default=[], help="also time the kernel built from these .cu files (same entry point)")
    p.add_argument("--cold-bytes", type=float, default=256e6)
    p.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "bench_gemv.json"))
    args = p.parse_args(argv)
    missing = [str(v) for v in args.variant if not v.is_file()]
    if missing:
        p.error(f"--variant: no such .cu file: {', '.join(missing)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not torch.cuda.is_available():
        print("bench_gemv needs a CUDA GPU", file=sys.stderr)
        return 2
    unbuilt = [str(s) for s in [cuda_gemv.SOURCE, *args.variant] if not cuda_gemv.available(torch.device("cuda"), s)]
    if unbuilt:
        print(f"the CUDA GEMV could not be built here from {', '.join(unbuilt)} (see the warning above)", file=sys.stderr)
        return 2
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = [r for name, (o, i) in SHAPES.items() for r in bench_shape(name, o, i, args.widths, args.all_shapes, args.variant, args.cold_bytes, gen)]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
