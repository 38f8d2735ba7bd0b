"""amq's Triton kernels checked on a machine without a GPU, under Triton's CPU interpreter.

Every kernel of `amq.runtime.triton_kernels` (the GEMV, both tile kernels and the dequantize kernel)
runs on random packed layers (fractional zero points, two layer shapes, groups of 128 and 64) and
is compared with the float32 product of `PackedLinear`'s weight, for each width, 1 to 20 activation
rows, bf16 and fp16 activations, and each split-K count the autotune lists (`--all-configs`: every
autotune configuration). Exit 1 if any relative error exceeds `--tol`. It checks what the kernels
compute, not their speed; the CUDA tests and `scripts/bench_serving.py` run them on a GPU.

    pip install -c constraints.txt triton==3.6.0     # about 640 MB; not part of `make setup`
    python scripts/check_kernels_cpu.py

The interpreter stores bf16 values as their 16 raw bits and its `tl.dot` multiplies those bits as
integers; this script makes its `tl.dot` read bf16 operands as numbers (`_interpreter_reads_bf16`).
The interpreter also rounds to bf16 by truncation, so errors are about twice a GPU's.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from typing import TYPE_CHECKING

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from amq.quantizers.packed import GroupQuant, PackedLinear  # noqa: E402
from amq.runtime.layout import TILE_ROWS_MAX, split_workspace  # noqa: E402
from amq.runtime.linear import PlanesLinear  # noqa: E402

if TYPE_CHECKING:
    from triton.runtime.autotuner import Autotuner

WIDTHS = (1, 2, 3, 4, 5, 6, 8)
ROWS = (1, 2, 7, 16, 20)  # 20: more rows than the decode kernels take, so the dequantize kernel and a matmul
SHAPES = ((96, 512, 128), (40, 768, 64))  # (out, in, group): rows that no block size divides


def _interpreter_reads_bf16() -> None:
    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    def as_float(h: TensorHandle) -> np.ndarray:
        return (h.data.astype(np.uint32) << 16).view(np.float32) if h.dtype.scalar == tl.bfloat16 else h.data

    def create_dot(self: InterpreterBuilder, a: TensorHandle, b: TensorHandle, d: TensorHandle, *_: object) -> TensorHandle:
        return TensorHandle(np.matmul(as_float(a), as_float(b), dtype=d.data.dtype) + d.data, d.dtype.scalar)

    def get_bf16(self: InterpreterBuilder, value: float) -> TensorHandle:
        return TensorHandle((np.array([value], dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16), tl.bfloat16)

    InterpreterBuilder.create_dot = create_dot
    InterpreterBuilder.get_bf16 = get_bf16

    # numpy 2.4 no longer converts a one-element 1-D array to a Python int, which the interpreter's
    # `tensor.__index__` (a loop bound such as `range(0, per, TPI)`) relies on
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor: type, scope: interpreter._LangPatchScope) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_lang_tensor


def _layer(out_f: int, in_f: int, group: int, bits: int, gen: torch.Generator) -> PlanesLinear:
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=gen, dtype=torch.uint8)
    scale = (torch.rand(out_f, in_f // group, generator=gen) * 0.02 + 1e-3).half()
    zero = (torch.rand(out_f, in_f // group, generator=gen) * (2**bits - 1)).half()
    return PlanesLinear(PackedLinear.from_quant(GroupQuant(codes, scale, zero, bits, group), None, torch.bfloat16))


def _splits(kernel: Autotuner, all_configs: bool) -> list:
    """The autotune configurations to run: every one, or the first of each split-K count."""
    if all_configs:
        return list(kernel.configs)
    first = {}
    for c in kernel.configs:
        first.setdefault(c.kwargs["SPLIT"], c)
    return list(first.values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--all-configs", action="store_true", help="every autotune configuration (slow), not one per split-K count")
    ap.add_argument("--tol", type=float, default=1e-2, help="largest relative error accepted (default 1e-2, as the CUDA tests)")
    args = ap.parse_args()
    try:
        import triton
    except ImportError:
        print("triton is not installed: pip install -c constraints.txt triton==3.6.0", file=sys.stderr)
        return 2
    from amq.runtime import triton_kernels as tk

    _interpreter_reads_bf16()
    print(f"triton {triton.__version__}, interpreter: {os.environ['TRITON_INTERPRET'] == '1'}")
    kernels = (tk._gemv_kernel, tk._gemm_kernel, tk._gemm_paired_kernel)
    configs = {k: _splits(k, args.all_configs) for k in kernels}
    gen = torch.Generator().manual_seed(0)
    worst, failed = 0.0, 0
    for (out_f, in_f, group), bits in itertools.product(SHAPES, WIDTHS):
        layer = _layer(out_f, in_f, group, bits, gen)
        weight = layer.weight_float()
        geometry = (layer.planes(), layer.scale, layer.zero, bits, group, layer.tile)
        for rows, dtype in itertools.product(ROWS, (torch.bfloat16, torch.float16)):
            x = torch.randn(rows, in_f, generator=gen).to(dtype)
            ref = x.float() @ weight.t()
            for i in range(max(len(c) for c in configs.values())):
                for k in kernels:  # one configuration per kernel, so each autotuner runs it without timing
                    k.configs = [configs[k][min(i, len(configs[k]) - 1)]]
                    k.cache.clear()
                if rows <= TILE_ROWS_MAX:
                    y = tk.product(x, *geometry, out_f, split_workspace(out_f, x.device))
                else:
                    y = x @ tk.dequantize(*geometry, out_f, in_f, dtype).t()
                err = float((y.float() - ref).norm() / ref.norm())
                worst = max(worst, err)
                if err > args.tol:
                    failed += 1
                    print(f"FAIL {out_f}x{in_f} group {group}, {bits} bits, {rows} rows, {dtype}, configuration {i}: rel. error {err:.2e}")
    print(f"{'failed ' + str(failed) if failed else 'all passed'}; largest relative error {worst:.2e} (tolerance {args.tol:g})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
