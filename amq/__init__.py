"""amq: automated layer-wise mixed-precision weight-only quantization search (AMQ)."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load_quantized(path: Any, device: Any = "cpu", runtime: str = "dequantized", compile: bool = False) -> Any:
    """Reload a model exported by the finalize stage (see amq.quantizers.export.load_quantized).

    `runtime="packed"` keeps the linears packed in memory (smaller, slower forwards); `"fast"`
    multiplies by the packed bits with a kernel per width (amq.runtime); `compile` fuses the
    dequantization with torch.compile.
    """
    from amq.quantizers.export import load_quantized as _load

    return _load(path, device, runtime, compile)
