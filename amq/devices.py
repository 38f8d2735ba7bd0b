"""Device and compute-dtype settings (`auto`, `cpu`, `cuda[:N]`; `auto`, `bfloat16`, ...) resolved
to torch objects, with a clear error.

`dtype: auto` picks what runs fast where the model runs: bfloat16 on CUDA and on CPUs with native
bf16 arithmetic (AVX512-BF16 or AMX on x86, BF16 on ARM), float32 elsewhere. On an AVX2-only CPU
bf16 matmuls are emulated and run about 6x slower than float32 (docs/benchmarks.md), so float32 is
both faster and more exact there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from amq.errors import InvalidArgument

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_CHOICES = ("auto", *DTYPES)
_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")


def resolve_device(device: str, argument: str = "device") -> torch.device:
    """`auto` is the GPU when one is available, else the CPU; `argument` names the caller's parameter in errors."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidArgument(argument, f"{device!r} requested but no CUDA device is available", "auto, cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise InvalidArgument(argument, f"unknown device {device!r}", "auto, cpu, cuda, cuda:N") from None


def cpu_features() -> dict[str, object]:
    """What torch reports of this CPU: its kernel capability (`AVX2`, `AVX512`, ...) and its flags."""
    caps = getattr(torch.cpu, "get_capabilities", None)
    flags = dict(caps()) if caps is not None else {}
    return {"capability": torch.backends.cpu.get_cpu_capability(), "flags": flags}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16, AMX, ARM BF16) rather than emulating it."""
    flags = cpu_features()["flags"]
    return any(bool(flags.get(f)) for f in _NATIVE_BF16_FLAGS)


@dataclass(frozen=True)
class ComputeDtype:
    """The dtype a model computes in, what was asked for, and why this one (for the run's protocol)."""

    dtype: torch.dtype
    requested: str
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def record(self) -> dict:
        return {"dtype": self.name, "requested": self.requested, "reason": self.reason}


def resolve_dtype(dtype: str, device: torch.device, argument: str = "dtype") -> ComputeDtype:
    """`auto`: bfloat16 on CUDA or a CPU with native bf16, float32 elsewhere; else the named dtype."""
    if dtype not in DTYPE_CHOICES:
        raise InvalidArgument(argument, f"unknown dtype {dtype!r}", ", ".join(DTYPE_CHOICES))
    if dtype != "auto":
        return ComputeDtype(DTYPES[dtype], dtype, "as set")
    if device.type == "cuda":
        return ComputeDtype(torch.bfloat16, dtype, "CUDA device")
    if device.type == "cpu":
        cap = cpu_features()["capability"]
        if cpu_has_native_bf16():
            return ComputeDtype(torch.bfloat16, dtype, f"CPU with native bf16 ({cap})")
        return ComputeDtype(torch.float32, dtype, f"CPU without native bf16 ({cap}): bf16 would be emulated")
    return ComputeDtype(torch.float32, dtype, f"{device.type} device")
