"""Fast runtime for packed models: kernels that multiply by the packed bits directly.

`amq.load_quantized` gives a model of `PackedLinear` layers, which either keep a dequantized bf16
copy (fast, but bf16-sized) or unpack on every call (small, but slow per decoded token). `convert`
swaps them for layers that keep only the bits and multiply by them with a kernel per width
(`served` says which). Decoding reads every weight once per token, so fewer bytes can mean faster
decoding; on one H200 (docs/benchmarks.md, "Serving speed on one H200") a Llama-2-7B shape with
4-bit weights decodes at batch 1 at 1.73x bf16's speed on the bit-plane kernels (one-row products
on a CUDA C++ GEMV built on first use where nvcc is installed, else Triton; products of 2-16 rows
on a CUDA C++ tensor-core kernel, likewise, at 2-4 bits; q/k/v and gate/up of one
width stacked into one layer each by `amq.runtime.fuse`), at bits/16 of the memory. Importing this package needs only torch; Triton is imported on the first CUDA forward.

    model = amq.load_quantized(dir, "cuda", runtime="fast")   # or: amq.runtime.convert(model)
"""

from amq.runtime.convert import DEFAULT_KERNELS, KERNELS, convert, served
from amq.runtime.linear import PlanesLinear, TinyGemmLinear

__all__ = ["DEFAULT_KERNELS", "KERNELS", "PlanesLinear", "TinyGemmLinear", "convert", "served"]
