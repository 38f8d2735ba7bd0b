"""The bit configuration as per-tensor types for llama.cpp's quantize tool (llama layouts).

`llama-quantize --tensor-type PATTERN=TYPE ...` overrides the type of the tensors whose GGUF name
matches PATTERN (a regex). We write one exact, escaped pattern per tensor. K-quant types work in
super-blocks of 256 weights, not in `group_size` groups, so the sizes differ slightly from ours.
"""

from __future__ import annotations

import re
from typing import Mapping

from amq.bits import BitConfig

# transformers Llama module names -> GGUF tensor names (llama.cpp's convert_hf_to_gguf mapping)
_LLAMA_ROLES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GGML_TYPE_FOR_BITS = {2: "q2_K", 3: "q3_K", 4: "q4_K", 5: "q5_K", 6: "q6_K", 8: "q8_0"}
LLAMA_CPP_ARCHITECTURES = ("llama", "mistral")
_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def gguf_tensor_name(module_name: str) -> str | None:
    """`model.layers.3.mlp.down_proj` -> `blk.3.ffn_down.weight` (None when not a llama linear)."""
    m = _NAME.match(module_name)
    if not m or m.group(2) not in _LLAMA_ROLES:
        return None
    return f"blk.{m.group(1)}.{_LLAMA_ROLES[m.group(2)]}.weight"


def tensor_types(config: BitConfig) -> dict[str, str]:
    """GGUF tensor name -> ggml type for every linear of the configuration.

    Raises ValueError for modules that are not llama linears or widths without a ggml type.
    """
    out = {}
    for name, bits in config.bits.items():
        tensor = gguf_tensor_name(name)
        if tensor is None:
            raise ValueError(f"{name} has no llama.cpp tensor name")
        if bits not in GGML_TYPE_FOR_BITS:
            raise ValueError(f"{bits}-bit has no llama.cpp type (available: {sorted(GGML_TYPE_FOR_BITS)})")
        out[tensor] = GGML_TYPE_FOR_BITS[bits]
    return out


def tensor_type_file(types: Mapping[str, str]) -> str:
    """One `PATTERN=TYPE` per line, the form `--tensor-type` takes, with a usage header."""
    lines = [
        "# Per-tensor types for llama.cpp (one --tensor-type argument per line). Usage:",
        "#   llama-quantize $(grep -v '^#' llama_cpp_tensor_types.txt | sed 's/^/--tensor-type /') \\",
        "#     model-f16.gguf model-amq.gguf Q4_K_M",
        "# The last type applies to the tensors not listed (embeddings, output, norms).",
    ]
    lines += [f"{re.escape(t)}={ty}" for t, ty in types.items()]
    return "\n".join(lines) + "\n"
