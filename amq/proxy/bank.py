"""The proxy bank: quantized weights of every linear at every bit width, swapped in on demand.

Built once per (model, quantizer settings, bit width) and cached on disk in packed form. During the
search, `apply()` changes only the linears whose bit width differs from what is loaded now, so a
candidate costs one forward pass plus a handful of pointer swaps (`dequantized` storage) or
dequantizations (`packed` storage, for GPUs where memory matters more than swap time).

`packed` keeps each group's scale and zero in float16 (as HQQ's own quantized layers do), half
the float32 that the quantizer returns: for {2, 3, 4} bits at group 128 the bank then holds about
0.60x the bf16 model's size instead of 0.64x. Its originals move to host memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from amq.errors import InvalidArgument
from amq.io import atomic_write_bytes_with, file_lock, remove_stale_temps
from amq.modeling.discovery import ModelLayout
from amq.quantizers.base import WeightQuantizer

log = logging.getLogger(__name__)

STORAGES = ("dequantized", "packed")
AUTO = "auto"  # by the model's device
_SWAP_GRAPHS = 64  # compiled swap graphs allowed: (bit widths) x (distinct linear shapes), e.g. 3 x 3 for Llama-2-7B


def _cache_key(fingerprint: str, quantizer: WeightQuantizer, nbits: int, layout: ModelLayout, weight: torch.Tensor) -> str:
    """What a width's quantized weights depend on: the model, the quantizer, the width, the layout,
    and the dtype and device of the weights it quantizes (bf16 and float32 weights quantize apart)."""
    payload = {
        "model": fingerprint,
        "dtype": str(weight.dtype),
        "device": weight.device.type,
        "quantizer": quantizer.settings(),
        "nbits": nbits,
        "linears": [(li.name, li.in_features, li.out_features) for li in layout.linears],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _cache_path(cache_dir: str | Path, fingerprint: str, quantizer: WeightQuantizer, layout: ModelLayout, weight: torch.Tensor, nbits: int) -> Path:
    """Where a width's quantized weights are cached (`weight`: any of the layout's, for its dtype and device)."""
    return Path(cache_dir) / f"{_cache_key(fingerprint, quantizer, nbits, layout, weight)}-{nbits}bit.pt"


def cached_width(
    cache_dir: str | Path, fingerprint: str, quantizer: WeightQuantizer, layout: ModelLayout, weight: torch.Tensor, nbits: int
) -> dict[str, tuple[torch.Tensor, dict]] | None:
    """A width's cached result ({name: (packed weights, meta)} on the CPU), as a bank built with these
    settings left it, or None where the cache holds none: for the finalize stage, which need not
    quantize again what the search quantized (amq.quantizers.hqq.group_quant_from_proxy)."""
    return ProxyBank._load_cached(_cache_path(cache_dir, fingerprint, quantizer, layout, weight, nbits))


class ProxyBank:
    """Holds quantized weights per bit width and swaps them into the live model."""

    def __init__(
        self,
        model: nn.Module,
        layout: ModelLayout,
        quantizer: WeightQuantizer,
        bits: list[int],
        storage: str = "dequantized",
    ) -> None:
        if storage == AUTO:  # packed where memory is short and dequantizing is cheap (a GPU); else the fastest swaps
            device = next(model.parameters()).device
            storage = "packed" if device.type == "cuda" else "dequantized"
            log.info("proxy storage auto: %s on %s", storage, device.type)
        if storage not in STORAGES:
            raise InvalidArgument("storage", f"{storage!r}", ", ".join((*STORAGES, AUTO)))
        self.model, self.layout, self.quantizer = model, layout, quantizer
        self.bits, self.storage = sorted(bits), storage
        self.modules: dict[str, nn.Linear] = {n: model.get_submodule(n) for n in layout.names}
        self._original = {n: m.weight for n, m in self.modules.items()}
        self._bank: dict[int, dict[str, object]] = {}
        self._current: dict[str, int | None] = {n: None for n in layout.names}
        self.build_seconds = 0.0
        self.cache_hits = 0
        self.fused_swaps = True  # packed storage on CUDA: one compiled kernel per dequantization
        self._fused_copy = None

    # ------------------------------------------------------------------ build
    def build(self, cache_dir: str | Path | None, fingerprint: str) -> "ProxyBank":
        """Quantize (or load from `cache_dir`) every width and hold it; `cache_dir=None`: no disk cache."""
        t0 = time.perf_counter()
        for nbits in self.bits:
            if cache_dir is None:
                packed = self.quantize_all(nbits)
            else:
                packed = self._cached_or_quantized(Path(cache_dir), fingerprint, nbits)
            self._bank[nbits] = self._materialize(packed)
        if self.storage == "packed":  # keep the originals off the accelerator; one work buffer per linear
            self._original = {n: nn.Parameter(w.detach().to("cpu"), requires_grad=False) for n, w in self._original.items()}
            for n, m in self.modules.items():
                m.weight = nn.Parameter(m.weight.detach().clone(), requires_grad=False)
        self.build_seconds = time.perf_counter() - t0
        log.info("proxy ready: %s bits, %s storage, %.1fs", self.bits, self.storage, self.build_seconds)
        return self

    def _cached_or_quantized(self, cache_dir: Path, fingerprint: str, nbits: int) -> dict:
        path = _cache_path(cache_dir, fingerprint, self.quantizer, self.layout, next(iter(self._original.values())), nbits)
        with file_lock(path):  # parallel jobs of a sweep: one quantizes, the others wait and reuse it
            packed = self._load_cached(path)
            if packed is None:
                remove_stale_temps(path)  # a job killed mid-write left its partial file
                packed = self.quantize_all(nbits)
                atomic_write_bytes_with(path, lambda tmp, p=packed: torch.save(p, tmp))
            else:
                self.cache_hits += 1
                log.info("proxy %d-bit: loaded from cache %s", nbits, path.name)
        return packed

    @staticmethod
    def _load_cached(path: Path) -> dict | None:
        if not path.exists():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # truncated or corrupted: recompute rather than trust it
            log.warning("proxy cache %s is unreadable (%s); re-quantizing", path.name, exc)
            return None

    def quantize_all(self, nbits: int) -> dict[str, tuple[torch.Tensor, dict]]:
        """Quantize every linear at `nbits` (no cache): packed weights and meta on the CPU."""
        out: dict[str, tuple[torch.Tensor, dict]] = {}
        names = self.layout.names
        t0, last = time.perf_counter(), time.perf_counter()
        for i, name in enumerate(names):
            w_q, meta = self.quantizer.quantize(self._original[name].detach(), nbits)
            out[name] = (w_q.cpu(), {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in meta.items()})
            if time.perf_counter() - last > 5 or i + 1 == len(names):
                log.info("proxy %d-bit: quantized %d/%d linears (%.1fs)", nbits, i + 1, len(names), time.perf_counter() - t0)
                last = time.perf_counter()
        return out

    def _materialize(self, packed: dict) -> dict[str, object]:
        bank: dict[str, object] = {}
        for name, (w_q, meta) in packed.items():
            ref = self._original[name]
            meta = {k: (v.to(ref.device) if torch.is_tensor(v) else v) for k, v in meta.items()}
            if self.storage == "dequantized":
                w = self.quantizer.dequantize(w_q.to(ref.device), meta).to(ref.dtype)
                bank[name] = nn.Parameter(w, requires_grad=False)
            else:
                meta = {k: (v.half() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in meta.items()}
                bank[name] = (w_q.to(ref.device), meta)
        return bank

    def weight(self, name: str, nbits: int | None) -> torch.Tensor:
        """One linear's weight at `nbits` (None: unquantized) as the model would hold it, without
        swapping it in (packed storage dequantizes a copy)."""
        if nbits is None:
            return self._original[name]
        held = self._held(nbits)[name]
        if self.storage == "dequantized":
            return held
        w_q, meta = held
        ref = self._original[name]  # packed storage keeps it on the CPU; the codes sit on the model's device
        out = torch.empty(ref.shape, dtype=ref.dtype, device=w_q.device)
        self.quantizer.dequantize_into(out, w_q, meta)
        return out

    def _held(self, nbits: int) -> dict[str, object]:
        """The bank's linears at `nbits`, refusing a width it was not built with."""
        if nbits not in self._bank:
            raise KeyError(f"{nbits}-bit is not in the proxy bank {self.bits}")
        return self._bank[nbits]

    # ------------------------------------------------------------------ swap
    def apply(self, config: Mapping[str, int | None]) -> int:
        """Load `config` (bits per module name; None = unquantized). Returns how many linears changed."""
        changed = 0
        for name, nbits in config.items():
            if self._current[name] == nbits:
                continue
            module = self.modules[name]
            held = None if nbits is None else self._held(nbits)[name]
            if self.storage == "dequantized":
                module.weight = self._original[name] if held is None else held
            elif held is None:
                module.weight.data.copy_(self._original[name].data)
            else:
                self._dequantize_into(module.weight.data, *held)
            self._current[name] = nbits
            changed += 1
        return changed

    def _dequantize_into(self, out: torch.Tensor, w_q: torch.Tensor, meta: dict) -> None:
        """Unpack, scale and cast into `out`. On CUDA, compiled: HQQ's eager unpacking keeps the GPU
        busy ~0.47 ms per 7B linear (a 7B swap then costs a quarter of a 4 x 2048-token forward);
        compiled for static shapes, ~0.15 ms. One graph per (width, shape): a model has a few."""
        if self.fused_swaps and out.is_cuda:
            if self._fused_copy is None:
                self._fused_copy = torch.compile(self.quantizer.dequantize_into, dynamic=False)
            try:
                with torch._dynamo.config.patch(recompile_limit=_SWAP_GRAPHS):
                    self._fused_copy(out, w_q, meta)
                return
            except Exception as exc:  # no working compiler: eager is correct, only slower
                log.warning("proxy swaps: torch.compile failed (%s); dequantizing eagerly", type(exc).__name__)
                self.fused_swaps = False
        self.quantizer.dequantize_into(out, w_q, meta)

    def block_states(self) -> tuple[tuple[int | None, ...], ...]:
        """The bits loaded in each decoder block's linears (None: unquantized), block by block:
        what tells the metric which blocks changed since its last pass."""
        per_block: list[list[int | None]] = [[] for _ in range(self.layout.n_blocks)]
        for li in self.layout.linears:
            per_block[li.block].append(self._current[li.name])
        return tuple(tuple(b) for b in per_block)

    def restore(self) -> None:
        """Put the unquantized weights back everywhere."""
        self.apply({n: None for n in self.layout.names})

    def release(self) -> None:
        """Put the unquantized weights back and drop the quantized ones: the finalize stage after a
        search needs the memory (7.5 GiB of a GPU at 7B), not the bank."""
        self.restore()
        self._bank.clear()
        self._fused_copy = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def memory_bytes(self) -> int:
        total = 0
        for per_bits in self._bank.values():
            for v in per_bits.values():
                if isinstance(v, torch.Tensor):
                    total += v.numel() * v.element_size()
                else:
                    w_q, meta = v
                    total += w_q.numel() * w_q.element_size()
                    total += sum(t.numel() * t.element_size() for t in meta.values() if torch.is_tensor(t))
        return total
