"""Which kernel serves which layer, and the swap of a loaded model's PackedLinear layers.

The choice per width is a table (`DEFAULT_KERNELS`) written from measurements on one H200
(docs/benchmarks.md, "Serving speed on one H200"; `scripts/bench_serving.py` re-measures it), not a
rule: a kernel serves a width only where it was measured to work and to pay. Layers no kernel serves
stay `PackedLinear` (its own runtime), and `convert` logs each such layer, so the limit is visible.
"""

from __future__ import annotations

import logging
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from amq.quantizers.packed import PackedLinear
from amq.runtime.fuse import fuse_siblings
from amq.runtime.layout import plane_widths, split_workspace, tile_size
from amq.runtime.linear import GEMM_MAX_ROWS, PlanesLinear, TinyGemmLinear, inner_k_tiles

log = logging.getLogger(__name__)

PLANES, TINYGEMM = PlanesLinear.kernel, TinyGemmLinear.kernel
KERNELS: dict[str, type[nn.Module]] = {PLANES: PlanesLinear, TINYGEMM: TinyGemmLinear}

# Measured on one H200 (bf16 activations, group 128; docs/benchmarks.md): the bit-plane kernels
# serve every width and every batch size; tinygemm is a little faster for 4-bit at one row (1.8-2.0x
# bf16 per product against 1.66-1.79x for the CUDA GEMV) but slower than bf16 from 16 rows on (0.5x)
# and 25x slower at prefill, so it is opt-in (`kernels={4: "tinygemm_int4"}`) for batch-1 decoding
# only; its layers are never stacked (`amq.runtime.fuse` stacks bit-plane layers).
DEFAULT_KERNELS: dict[int, str] = {2: PLANES, 3: PLANES, 4: PLANES, 8: PLANES}
TINYGEMM_GROUPS = (32, 64, 128, 256)
ACTIVATION_DTYPES = (torch.bfloat16, torch.float16)


def _can_serve(kernel: str, bits: int, group_size: int, dtype: torch.dtype, device: torch.device) -> bool:
    if kernel == TINYGEMM:
        return bits == 4 and group_size in TINYGEMM_GROUPS and dtype == torch.bfloat16
    if kernel == PLANES:
        ok = len(plane_widths(bits)) <= 2 and group_size % 8 == 0 and dtype in ACTIVATION_DTYPES
        if ok and device.type == "cuda":
            try:
                import triton  # noqa: F401
            except ImportError:
                return False
        return ok and device.type in ("cuda", "cpu")
    return False


def served(
    bits: int,
    group_size: int,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
    kernels: Mapping[int, str] | None = None,
) -> str | None:
    """The kernel that serves layers of this width and group size (None: they fall back to PackedLinear).

    `kernels` overrides `DEFAULT_KERNELS` per width (e.g. `{4: "tinygemm_int4"}`). Layer shapes add
    two conditions `convert` checks per layer: in_features a multiple of 32 (both kernels) and of
    the group size.
    """
    if not 1 <= bits <= 8:
        return None
    table = {**DEFAULT_KERNELS, **(kernels or {})}
    kernel = table.get(bits)
    if kernel is None:
        return None
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r} (valid: {', '.join(KERNELS)})")
    return kernel if _can_serve(kernel, bits, group_size, dtype, torch.device(device)) else None


SERVE_WITH = ("fast", "vllm")  # values of the `search.serve_with` setting (vllm: `compressed_tensors.check_vllm_servable`)


def check_servable(bits: Sequence[int], group_size: int, in_features: Iterable[int], dtype: torch.dtype = torch.bfloat16) -> None:
    """Refuse a search space whose models the default kernels cannot serve whole on a GPU.

    Why: a configuration with a width no kernel takes runs that layer through `PackedLinear`, which
    is several times slower per decoded token, so the speed the bits promise is lost. Checked before
    the search (`search.serve_with=fast`), from the widths, the group size and the layers' input widths.
    """
    from amq.errors import InvalidArgument

    served_bits = [b for b in range(1, 9) if served(b, group_size, dtype, "cpu") is not None]  # the same widths as on a GPU with Triton
    missing = [b for b in bits if b not in served_bits]
    if missing:
        valid = ", ".join(map(str, served_bits)) or "none at this group size"
        raise InvalidArgument("bits", f"{missing[0]}-bit has no fast kernel at group {group_size}", f"widths from {valid}")
    for width in sorted(set(in_features)):
        bad = [b for b in bits if tile_size(width, b, group_size) is None]
        if bad:
            raise InvalidArgument(
                "group_size", f"{group_size} with {bad[0]}-bit leaves layers of {width} input features without a kernel tile", "32, 64 or 128"
            )


def _shape_ok(kernel: str, layer: PackedLinear) -> bool:
    if kernel == PLANES:
        return tile_size(layer.in_features, layer.bits, layer.group_size) is not None
    return kernel != TINYGEMM or (inner_k_tiles(layer.in_features) is not None and layer.out_features % 8 == 0)


def convert(
    model: nn.Module,
    kernels: Mapping[int, str] | None = None,
    dtype: torch.dtype | None = None,
    gemm_max_rows: int = GEMM_MAX_ROWS,
    fuse: bool = True,
) -> dict[str, str]:
    """Replace every `PackedLinear` of `model` that a kernel serves by that kernel's layer, in place.

    Convert on the device the model runs on (tinygemm's layout depends on it, and the bit-plane
    layers of one device share one split-K scratch, so moving them afterwards gives each a copy).
    `dtype` is the activation dtype (default: the model's first floating parameter's). With `fuse`,
    sibling projections of one width (q/k/v, gate/up) are then stacked into one layer each
    (`amq.runtime.fuse`). Returns {layer name: kernel name}, with "fallback" for layers left as
    PackedLinear.
    """
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.bfloat16)
    chosen: dict[str, str] = {}
    packed = [(n, m) for n, m in model.named_modules() if isinstance(m, PackedLinear)]
    rows: dict[torch.device, int] = {}
    for _, layer in packed:
        rows[layer.qweight.device] = max(rows.get(layer.qweight.device, 0), layer.out_features)
    workspaces = {device: split_workspace(n, device) for device, n in rows.items()}  # layers run one after another
    for name, layer in packed:
        kernel = served(layer.bits, layer.group_size, dtype, layer.qweight.device, kernels)
        if kernel is None or not _shape_ok(kernel, layer):
            log.warning(
                "%s: %d-bit, group %d, %s on %s has no fast kernel; kept as PackedLinear", name, layer.bits, layer.group_size, dtype, layer.qweight.device
            )
            chosen[name] = "fallback"
            continue
        new = TinyGemmLinear(layer, dtype) if kernel == TINYGEMM else PlanesLinear(layer, gemm_max_rows, workspaces[layer.qweight.device])
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        chosen[name] = kernel
    counts = {k: sum(v == k for v in chosen.values()) for k in sorted(set(chosen.values()))}
    log.info("converted %d packed layers: %s", len(chosen), counts)
    if fuse:
        fuse_siblings(model)
    return chosen
