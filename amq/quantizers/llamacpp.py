"""The bit configuration as per-tensor types for llama.cpp's quantize tool.

Kept for the finalize stage and other callers; the mapping lives in `amq.llamacpp.gguf_plan`
(names for every architecture llama.cpp names alike, types that each tensor's row length allows),
and `scripts/llama_cpp.py` runs llama.cpp on it for real.
"""

from __future__ import annotations

from amq.llamacpp.gguf_plan import ARCHITECTURES, TYPE_CANDIDATES, gguf_tensor_names, plan, row_lengths, tensor_type_file, tensor_types

LLAMA_CPP_ARCHITECTURES: tuple[str, ...] = tuple(ARCHITECTURES)
# the type each width gets when a tensor's rows allow every type (its K-quant; q8_0 for 8 bits)
GGML_TYPE_FOR_BITS: dict[int, str] = {bits: candidates[0][0] for bits, candidates in TYPE_CANDIDATES.items()}

__all__ = ["GGML_TYPE_FOR_BITS", "LLAMA_CPP_ARCHITECTURES", "gguf_tensor_names", "plan", "row_lengths", "tensor_type_file", "tensor_types"]
