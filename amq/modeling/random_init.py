"""Models of published architectures with random weights, for speed measurements.

Timing does not depend on weight values, so a model built from an architecture's config.json
with random weights measures what the real one costs, with no download. Created directly on the
target device in bf16, so host memory is never the limit.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from amq.errors import InvalidArgument

# Llama-family shapes as published in each model's config.json, and a tiny one for tests.
# fmt: off
ARCHS: dict[str, dict] = {
    "llama2-7b": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
    ),
    "tiny": dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=512, max_position_embeddings=256, rms_norm_eps=1e-5,
    ),
}
# fmt: on


def random_llama(arch: str, device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> LlamaForCausalLM:
    """`arch` (a key of ARCHS) with random weights, created on `device`, in eval mode without grads."""
    if arch not in ARCHS:
        raise InvalidArgument("arch", f"unknown architecture {arch!r}", ", ".join(ARCHS))
    with torch.device(device):
        model = LlamaForCausalLM._from_config(LlamaConfig(**ARCHS[arch]), dtype=dtype)
    return model.eval().requires_grad_(False)
