"""Device settings (`auto`, `cpu`, `cuda[:N]`) resolved to a torch device, with a clear error."""

from __future__ import annotations

import torch

from amq.errors import ConfigError


def resolve_device(device: str, setting: str) -> torch.device:
    """`auto` is the GPU when one is available, else the CPU; `setting` names the option in errors."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(setting, f"{device!r} requested but no CUDA device is available", "auto, cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(setting, f"unknown device {device!r}", "auto, cpu, cuda, cuda:N") from None
