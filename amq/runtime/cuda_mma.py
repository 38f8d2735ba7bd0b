"""The few-row product (batched decoding, 2 to 16 rows) in CUDA C++ on the tensor cores:
`cuda/mma_planes.cu`, built on first use.

Why beside the Triton tile kernel: at 16 rows that kernel is bound by latency at low occupancy, and
its 2- and 3-bit forms run slower than 4 bits although they read fewer bytes (docs/benchmarks.md),
so a mixed-precision model decoded batches slower than a uniform 4-bit one. This kernel unpacks each
thread's words straight into the tensor cores' operand registers (the mma's k slots take the codes in
the order the layout stores them; the activations are staged in the matching order), so it reads the
same bit-plane layout as every other kernel and a layer keeps one copy of its bits.

It serves 2, 3 and 4 bits with bf16 activations, tiles of 256 (every Llama-shaped layer) and groups
of 32, 64, 128 or a multiple of 256; everything else (8 bits, fp16 activations, narrower layers'
tiles) goes on to the Triton tile kernel, as does everything where it cannot be built (no nvcc).
Of what it takes, products go to it only where it measured faster (`preferred`: 2 and 3 bits at 2-16
rows, 4 bits at 2-8, every width at 2-16 rows on layers of `WIDE_ROWS` rows or more). `AMQ_CUDA_MMA=0`
turns it off.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType

import torch

from amq.runtime.cuda_build import build, extension_name
from amq.runtime.layout import SPLIT_MAX, TILE_ROWS_MAX, plane_widths

ENV = "AMQ_CUDA_MMA"
SOURCE = Path(__file__).with_name("cuda") / "mma_planes.cu"
WIDTHS = (2, 3, 4)
TILE = 256
BLOCK_ROWS = 64  # weight rows per block (BLOCK_ROWS in the .cu)
BLOCKS_PER_SM = 2  # split-K slices are added until about this many blocks per multiprocessor run
# per width, the most rows at which the kernel took less time than the Triton tile kernel over a
# Llama-2-7B decoder block's products, q/k/v and gate/up stacked (one H100; docs/benchmarks.md, "The
# CUDA tile kernel"): above them the Triton kernel serves, except on layers of WIDE_ROWS rows or more
FASTER_UP_TO = {2: 16, 3: 16, 4: 8}
# from this many output rows (stacked gate/up: 22016) the kernel fills the GPU with one K slice and
# beats the Triton kernel at 16 rows at every width (2 / 3 / 4 bits: 1.61x / 1.88x / 1.31x on one H100)
WIDE_ROWS = 16384

_WRAPPER = """
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>

bool amq_mma_planes(const void* x, const int32_t* p0, const int32_t* p1, const void* scale, const void* zero, void* y, float* partial, int* count,
                    int p0w, int p1w, int m, int n, int k, int tile, int group, int split, cudaStream_t stream);

torch::Tensor mma(torch::Tensor x, torch::Tensor p0, torch::Tensor p1, torch::Tensor scale, torch::Tensor zero, torch::Tensor partial,
                  torch::Tensor count, int64_t p0w, int64_t p1w, int64_t n, int64_t tile, int64_t group, int64_t split) {
  auto y = torch::empty({x.size(0), n}, x.options());
  const bool ok = amq_mma_planes(x.data_ptr(), p0.data_ptr<int32_t>(), p1.data_ptr<int32_t>(), scale.data_ptr(), zero.data_ptr(), y.data_ptr(),
                                 partial.data_ptr<float>(), count.data_ptr<int32_t>(), p0w, p1w, x.size(0), n, x.size(1), tile, group, split,
                                 at::cuda::getCurrentCUDAStream());
  return ok ? y : torch::Tensor();  // None in Python: the caller uses the Triton tile kernel
}
"""


@functools.lru_cache(maxsize=None)
def _module(capability: tuple[int, int], source: Path = SOURCE) -> ModuleType | None:
    """The built extension for one compute capability, or None (logged once) where it cannot be built.
    `source`: another .cu with the same entry point (a variant to measure beside the shipped one)."""
    name = extension_name("amq_mma_planes", source, SOURCE)
    return build(name, _WRAPPER, source, ["mma"], capability, ENV, "CUDA tile kernel", "products of 2-16 rows use the Triton tile kernel")


def available(device: torch.device, source: Path = SOURCE) -> bool:
    """Whether the kernel is built (building it now if need be) for this device."""
    return device.type == "cuda" and _module(torch.cuda.get_device_capability(device), source) is not None


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def groups_served(group_size: int) -> bool:
    """Group sizes the kernel is built for: 32, 64, 128 (2 to 8 groups per tile) or whole tiles."""
    return group_size in (32, 64, 128) or group_size % TILE == 0


def fits(x: torch.Tensor, planes: list[torch.Tensor], scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int, tile: int) -> bool:
    """Whether the kernel takes this product: 2 to 16 contiguous bf16 rows, 2/3/4 bits, tiles of
    256, a served group size, 16-byte aligned activations, planes, scales and zero points (fp16)."""
    if not (x.is_cuda and x.dim() == 2 and 2 <= x.shape[0] <= TILE_ROWS_MAX and x.dtype == torch.bfloat16 and x.is_contiguous()):
        return False
    if bits not in WIDTHS or tile != TILE or not groups_served(group_size) or x.data_ptr() % 16:
        return False
    if any(p.dtype != torch.int32 or not p.is_contiguous() or p.data_ptr() % 16 for p in planes):
        return False
    return all(t.dtype == torch.float16 and t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (scale, zero))


def preferred(bits: int, rows: int, n: int = 0) -> bool:
    """Whether products of this width, row count and output size n go to this kernel (where it takes them)."""
    if bits not in FASTER_UP_TO:
        return False
    return 2 <= rows <= (TILE_ROWS_MAX if n >= WIDE_ROWS else FASTER_UP_TO[bits])


def split_for(n: int, k: int, multiprocessors: int) -> int:
    """K slices per row block: enough blocks to fill the GPU on layers of few rows (4096), at most
    SPLIT_MAX (the workspace's size) and one tile per slice."""
    blocks = -(-n // BLOCK_ROWS)
    return max(1, min(SPLIT_MAX, k // TILE, -(-BLOCKS_PER_SM * multiprocessors // blocks)))


def mma(
    x: torch.Tensor,
    planes: list[torch.Tensor],
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
    tile: int,
    n: int,
    workspace: tuple[torch.Tensor, torch.Tensor],
    split: int | None = None,
    source: Path = SOURCE,
) -> torch.Tensor | None:
    """y (m, n) = x (m, k) @ W.T, or None where the kernel does not take the product (`fits`) or is
    not built: the caller then uses the Triton tile kernel. `workspace`: the split-K scratch
    (`layout.split_workspace`), shared with the Triton kernels (both leave it zeroed). `split`: K
    slices instead of `split_for`'s (to measure; the workspace must hold split x m x n floats).
    `source`: a variant of the kernel to measure (`_module`)."""
    if not fits(x, planes, scale, zero, bits, group_size, tile):
        return None
    module = _module(torch.cuda.get_device_capability(x.device), source)
    if module is None:
        return None
    widths = plane_widths(bits)
    if split is None:
        split = split_for(n, x.shape[1], _multiprocessors(x.device.index if x.device.index is not None else torch.cuda.current_device()))
    partial, count = workspace
    return module.mma(x, planes[0], planes[-1], scale, zero, partial, count, widths[0], widths[1] if len(widths) > 1 else 0, n, tile, group_size, split)
