"""The compute dtype follows the device: bf16 where it is native, float32 where it would be emulated."""

from __future__ import annotations

import pytest
import torch

from amq import devices
from amq.errors import ConfigError

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({"avx2": True}, torch.float32),
        ({"avx2": True, "avx512_f": True}, torch.float32),
        ({"avx512_f": True, "avx512_bf16": True}, torch.bfloat16),
        ({"amx_bf16": True, "amx_tile": True}, torch.bfloat16),
        ({"neon": True, "bf16": True}, torch.bfloat16),
        ({}, torch.float32),
    ],
)
def test_auto_on_cpu_follows_native_bf16(monkeypatch, flags, expected):
    monkeypatch.setattr(devices, "cpu_features", lambda: {"capability": "TEST", "flags": flags})
    chosen = devices.resolve_dtype("auto", CPU)
    assert chosen.dtype == expected
    assert chosen.record()["requested"] == "auto" and "TEST" in chosen.reason


def test_auto_on_cuda_is_bf16_and_explicit_dtypes_are_kept():
    assert devices.resolve_dtype("auto", torch.device("cuda")).dtype == torch.bfloat16
    for name, dtype in devices.DTYPES.items():
        assert devices.resolve_dtype(name, CPU).dtype == dtype


def test_this_cpu_is_described_truthfully():
    """What torch says of this machine decides `auto` (no mock)."""
    chosen = devices.resolve_dtype("auto", CPU).dtype
    assert chosen == (torch.bfloat16 if devices.cpu_has_native_bf16() else torch.float32)


def test_unknown_dtype_names_the_argument():
    with pytest.raises(ConfigError, match=r"^dtype: unknown dtype 'fp8'.*auto, bfloat16"):
        devices.resolve_dtype("fp8", CPU)
