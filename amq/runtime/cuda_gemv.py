"""The one-row product (batch-1 decoding) in CUDA C++: `cuda/gemv_planes.cu`, built on first use.

Why a second GEMV beside the Triton one: batch-1 decoding reads every weight once per token, so a
product should cost its bytes, and the Triton GEMV is bound by instruction issue (9-11 instructions
per weight; docs/benchmarks.md). The CUDA kernel reads the same bit-plane layout, so a layer holds
one copy of its bits for every batch size; it serves widths 2, 3, 4 and 8 at one row, and every
other case goes on to the Triton kernels.

It is built with torch's extension builder (nvcc and a C++ compiler, once per machine and source;
the build is cached in torch's extensions folder, outside the repository). Where it cannot be built
(no nvcc, a failed build) one warning says so and the Triton GEMV serves: slower, never wrong.
`AMQ_CUDA_GEMV=0` turns it off.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType

import torch

from amq.runtime.cuda_build import build, extension_name
from amq.runtime.layout import plane_widths, runs_per_group

ENV = "AMQ_CUDA_GEMV"
SOURCE = Path(__file__).with_name("cuda") / "gemv_planes.cu"
WIDTHS = (2, 3, 4, 8)  # the instantiated plane pairs: (2, 0), (2, 1), (4, 0), (8, 0)
# (rows per chunk, warps per block, chunks per block): the `shape` of the .cu, one per width
SHAPES = ((2, 2, 2), (4, 2, 2), (4, 4, 2), (8, 4, 1))
_SHAPE_OF = {2: 0, 3: 1, 4: 2, 8: 3}  # measured best on one H100 (docs/benchmarks.md)
GROUPS_PER_TILE = (1, 2)  # instantiated: a tile's runs fall into 1 or 2 quantization groups

_WRAPPER = """
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>

bool amq_gemv_planes(const void* x, bool bf16, const int32_t* p0, const int32_t* p1, const void* scale, const void* zero, void* y,
                     int p0w, int p1w, int n, int k, int tile, int group, int gpt, int shape, cudaStream_t stream);

torch::Tensor gemv(torch::Tensor x, torch::Tensor p0, torch::Tensor p1, torch::Tensor scale, torch::Tensor zero,
                   int64_t p0w, int64_t p1w, int64_t n, int64_t tile, int64_t group, int64_t gpt, int64_t shape) {
  auto y = torch::empty({1, n}, x.options());
  const bool ok = amq_gemv_planes(x.data_ptr(), x.scalar_type() == at::kBFloat16, p0.data_ptr<int32_t>(), p1.data_ptr<int32_t>(),
                                  scale.data_ptr(), zero.data_ptr(), y.data_ptr(), p0w, p1w, n, x.size(1), tile, group, gpt, shape,
                                  at::cuda::getCurrentCUDAStream());
  // No kernel built for these widths and shape: an undefined tensor, None in Python (the caller then
  // uses the Triton GEMV). Not an exception: one thrown here was seen to crash the process.
  return ok ? y : torch::Tensor();
}
"""


@functools.lru_cache(maxsize=None)
def _module(capability: tuple[int, int], all_shapes: bool = False, source: Path = SOURCE) -> ModuleType | None:
    """The built extension for one compute capability, or None (logged once) where it cannot be built.
    `all_shapes`: every block shape for every width (a separate build, for re-measuring the shapes).
    `source`: another .cu with the same entry point (a variant to measure beside the shipped one)."""
    name = extension_name("amq_gemv_planes", source, SOURCE) + ("_all_shapes" if all_shapes else "")
    return build(name, _WRAPPER, source, ["gemv"], capability, ENV, "CUDA GEMV", "one-row products use the Triton GEMV", _shape_flags(all_shapes))


def available(device: torch.device, source: Path = SOURCE) -> bool:
    """Whether the CUDA GEMV is built (building it now if need be) for this device."""
    return device.type == "cuda" and _module(torch.cuda.get_device_capability(device), source=source) is not None


def fits(x: torch.Tensor, planes: list[torch.Tensor], scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int, tile: int) -> bool:
    """Whether the kernel takes this product: one row of bf16/fp16 activations, a width it was built
    for, whole 16-byte loads of every row's words (4 words per tile and plane), 1 or 2 groups per
    tile, fp16 scale and zero."""
    if not (x.is_cuda and x.dim() == 2 and x.shape[0] == 1 and x.dtype in (torch.bfloat16, torch.float16) and x.is_contiguous()):
        return False
    if bits not in WIDTHS or (tile * plane_widths(bits)[0] // 32) % 4 or _groups_per_tile(bits, tile, group_size) not in GROUPS_PER_TILE:
        return False
    if x.data_ptr() % 8 or any(p.dtype != torch.int32 or not p.is_contiguous() or p.data_ptr() % 16 for p in planes):
        return False
    return all(t.dtype == torch.float16 and t.is_contiguous() for t in (scale, zero))


def gemv(
    x: torch.Tensor,
    planes: list[torch.Tensor],
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
    tile: int,
    n: int,
    shape: int | None = None,
    source: Path = SOURCE,
) -> torch.Tensor | None:
    """y (1, n) = x (1, k) @ W.T, or None where the kernel does not take the product (`fits`) or is
    not built: the caller then uses the Triton GEMV. `shape` (an index into SHAPES) overrides the
    width's own block shape, from a build of every shape. `source`: a variant of the kernel to
    measure (`_module`)."""
    if not fits(x, planes, scale, zero, bits, group_size, tile):
        return None
    module = _module(torch.cuda.get_device_capability(x.device), shape is not None, source)
    if module is None:
        return None
    widths = plane_widths(bits)
    p0w, p1w = widths[0], widths[1] if len(widths) > 1 else 0
    gpt = _groups_per_tile(bits, tile, group_size)
    return module.gemv(x, planes[0], planes[-1], scale, zero, p0w, p1w, n, tile, group_size, gpt, block_shape(bits) if shape is None else shape)


def block_shape(bits: int) -> int:
    """The block shape (index into SHAPES) measured best for this width on one H100, on all three of
    Llama-2-7B's layer shapes (docs/benchmarks.md, "The GEMV's row chunks"); the build holds only it."""
    return _SHAPE_OF[bits]


def _shape_flags(all_shapes: bool) -> list[str]:
    """nvcc defines that build each width at its own block shape only (or every shape)."""
    return ["-DAMQ_GEMV_ALL_SHAPES"] if all_shapes else [f"-DAMQ_SHAPE_{bits}={shape}" for bits, shape in _SHAPE_OF.items()]


def _groups_per_tile(bits: int, tile: int, group_size: int) -> int:
    """Groups a tile's runs fall into (a run never straddles two: `layout.tile_size`)."""
    return 32 // plane_widths(bits)[0] // runs_per_group(bits, tile, group_size)
