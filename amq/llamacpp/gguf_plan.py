"""A searched bit configuration as llama.cpp per-tensor types (`llama-quantize --tensor-type`).

Two facts shape the mapping:

- Names. llama.cpp's converter names the decoder linears of the llama-like families the same way
  (`blk.N.attn_q/attn_k/attn_v/attn_output/ffn_gate/ffn_up/ffn_down.weight`); families that fuse
  them (phi3's attn_qkv) or keep them elsewhere are refused rather than guessed. In its
  mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE) a block's experts are one tensor per
  projection (`ffn_gate_exps`, `ffn_up_exps`, `ffn_down_exps`: one type for all experts), so a plan
  gives those its experts' one width (amq's default `search.expert_genes=projection` searches
  exactly that) and refuses experts of one projection at different widths; a shared expert is
  `ffn_gate_shexp/ffn_up_shexp/ffn_down_shexp`.
- Row lengths. K-quants (q2_K ... q6_K) work in super-blocks of 256 weights along a row, and a
  row is a linear's input width. SmolLM2 (hidden 576) and Gemma-3-270M (hidden 640) have many
  linears whose rows are not a multiple of 256; llama-quantize would silently swap in another type
  (its "fallback"). We choose the type ourselves, per tensor, from what its row length allows:
  the K-quant of the width when it fits, else a 32/64-weight block type. There is no 3-bit type
  with blocks under 256 weights, so 3 bits rounds up to q4_0 there (llama.cpp's own fallback for
  q3_K); 6 bits rounds up to q8_0 (its fallback for q6_K); 2 bits uses q2_0 (64-weight blocks,
  2.25 bits per weight). 4 bits uses q4_0 (4.5 bits per weight, the size of q4_K and of amq's
  4-bit at group 64), where llama.cpp's fallback for q4_K would spend 5.5 (q5_0).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

from amq.bits import BitConfig
from amq.errors import InvalidArgument
from amq.modeling.discovery import LinearInfo

# transformers model_type -> llama.cpp architecture whose decoder linears carry the names below
ARCHITECTURES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",  # converted as llama
    "mixtral": "llama",  # llama with experts (ffn_*_exps)
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
}
ROLES: dict[str, str] = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp",
}
# an expert's linears (`mlp.experts.E.gate_up_proj`, amq's unfused experts) -> the block's fused tensors
EXPERT_ROLES: dict[str, tuple[str, ...]] = {"gate_up_proj": ("ffn_gate_exps", "ffn_up_exps"), "down_proj": ("ffn_down_exps",)}
_EXPERT = re.compile(r"^mlp\.experts\.\d+\.(\w+)$")
# `model.layers.3.mlp.down_proj`, also under a multimodal wrapper (`model.language_model.layers.3...`)
_NAME = re.compile(r"^(?:model\.)?(?:language_model\.)?(?:model\.)?layers\.(\d+)\.(.+)$")

# Per width, the types to try in order, each with the row-length multiple it needs.
TYPE_CANDIDATES: dict[int, tuple[tuple[str, int], ...]] = {
    2: (("q2_K", 256), ("q2_0", 64), ("q4_0", 32)),
    3: (("q3_K", 256), ("q4_0", 32)),
    4: (("q4_K", 256), ("q4_0", 32)),
    5: (("q5_K", 256), ("q5_0", 32)),
    6: (("q6_K", 256), ("q8_0", 32)),
    8: (("q8_0", 32),),
}
# bits per weight of each ggml type, scales included (ggml's block sizes)
TYPE_BPW: dict[str, float] = {
    "q2_K": 2.625, "q3_K": 3.4375, "q4_K": 4.5, "q5_K": 5.5, "q6_K": 6.5625, "q8_0": 8.5,
    "q2_0": 2.25, "q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5, "q5_1": 6.0, "iq4_nl": 4.5,
    "f16": 16.0, "bf16": 16.0, "f32": 32.0,
}  # fmt: skip
UNALIGNED_TYPE = "f16"  # rows not a multiple of 32: no block type fits (llama.cpp does the same)


def valid_widths() -> str:
    return ", ".join(str(b) for b in sorted(TYPE_CANDIDATES))


def architecture(model_type: str | None) -> str:
    """llama.cpp's architecture for a transformers `model_type`; InvalidArgument when it names linears otherwise."""
    if model_type not in ARCHITECTURES:
        raise InvalidArgument(
            "model_type", f"{model_type!r} is not an architecture whose linears llama.cpp names blk.N.attn_q/.../ffn_down", ", ".join(ARCHITECTURES)
        )
    return ARCHITECTURES[model_type]


def gguf_tensor_names(module_name: str) -> tuple[str, ...]:
    """The GGUF tensors a decoder linear's weights go to: `model.layers.3.mlp.down_proj` ->
    (`blk.3.ffn_down.weight`,), an expert's `mlp.experts.5.gate_up_proj` -> (`blk.3.ffn_gate_exps.weight`,
    `blk.3.ffn_up_exps.weight`); () when it is not a decoder linear llama.cpp names."""
    m = _NAME.match(module_name)
    if not m:
        return ()
    block, rest = m.groups()
    expert = _EXPERT.match(rest)
    roles = (ROLES[rest],) if rest in ROLES else EXPERT_ROLES.get(expert.group(1), ()) if expert else ()
    return tuple(f"blk.{block}.{role}.weight" for role in roles)


def row_lengths(linears: Iterable[LinearInfo]) -> dict[str, int]:
    """GGUF tensor name -> row length (the input width) for the model's decoder linears, without converting it."""
    return {tensor: li.in_features for li in linears for tensor in gguf_tensor_names(li.name)}


def ggml_type(bits: int, row_length: int | None = None) -> str:
    """The ggml type for a `bits`-wide linear whose rows hold `row_length` weights (None: assume 256-aligned)."""
    if bits not in TYPE_CANDIDATES:
        raise InvalidArgument("bits", f"{bits}-bit has no llama.cpp type", valid_widths())
    for name, block in TYPE_CANDIDATES[bits]:
        if row_length is None or row_length % block == 0:
            return name
    return UNALIGNED_TYPE


@dataclass(frozen=True)
class TensorChoice:
    """One GGUF tensor's planned type (the linear, or a block's experts of one projection, it holds),
    and whether its row length forced a different one."""

    modules: tuple[str, ...]
    tensor: str
    bits: int
    row_length: int | None
    ggml_type: str

    @property
    def preferred(self) -> str:
        """The type the width gets when rows allow everything (its K-quant)."""
        return TYPE_CANDIDATES[self.bits][0][0]

    @property
    def substituted(self) -> bool:
        return self.ggml_type != self.preferred


def plan(config: BitConfig, row_lengths: Mapping[str, int] | None = None) -> list[TensorChoice]:
    """Every GGUF tensor of the configuration's linears with its type; `row_lengths` is keyed by GGUF tensor name.

    Raises InvalidArgument (a ValueError) for a module that is not a decoder linear, a width with
    no ggml type, experts of one fused tensor at different widths, or (when `row_lengths` is given)
    a tensor the GGUF does not hold.
    """
    members: dict[str, list[tuple[str, int]]] = {}
    for name, bits in config.bits.items():
        tensors = gguf_tensor_names(name)
        if not tensors:
            valid = f"decoder linears named model.layers.N.({'|'.join(ROLES)}) or model.layers.N.mlp.experts.E.({'|'.join(EXPERT_ROLES)})"
            raise InvalidArgument("bit_config", f"{name} has no llama.cpp tensor name", valid)
        for tensor in tensors:
            members.setdefault(tensor, []).append((name, int(bits)))
    out = []
    for tensor, linears in members.items():
        widths = sorted({bits for _, bits in linears})
        if len(widths) > 1:
            raise InvalidArgument(
                "bit_config",
                f"{tensor} holds {len(linears)} experts at {'/'.join(map(str, widths))} bits, and llama.cpp keeps them in one tensor of one type",
                "one width per projection of a layer's experts (search.expert_genes=projection, the default)",
            )
        row = None
        if row_lengths is not None:
            if tensor not in row_lengths:
                raise InvalidArgument("bit_config", f"{linears[0][0]} -> {tensor} is not in the converted GGUF", "a bit configuration searched on this model")
            row = int(row_lengths[tensor])
        out.append(TensorChoice(tuple(n for n, _ in linears), tensor, widths[0], row, ggml_type(widths[0], row)))
    return out


def tensor_types(config: BitConfig, row_lengths: Mapping[str, int] | None = None) -> dict[str, str]:
    """GGUF tensor name -> ggml type for every linear of the configuration (see `plan`)."""
    return {c.tensor: c.ggml_type for c in plan(config, row_lengths)}


def planned_bpw(choices: list[TensorChoice], numels: Mapping[str, int]) -> float:
    """Parameter-weighted bits per weight of the planned types (scales included), over the plan's tensors."""
    total = sum(numels[c.tensor] for c in choices)
    return sum(numels[c.tensor] * TYPE_BPW[c.ggml_type] for c in choices) / total


def tensor_type_file(types: Mapping[str, str]) -> str:
    """One `PATTERN=TYPE` per line, the form `--tensor-type` takes, with a usage header."""
    lines = [
        "# Per-tensor types for llama.cpp (one --tensor-type argument per line). Usage:",
        "#   llama-quantize $(grep -v '^#' llama_cpp_tensor_types.txt | sed 's/^/--tensor-type /') \\",
        "#     model-f16.gguf model-amq.gguf Q4_K_M",
        "# The last type applies to the tensors not listed (embeddings, output, norms).",
        "# Types follow each tensor's row length: K-quants need rows of a multiple of 256 weights (amq/llamacpp/gguf_plan.py).",
    ]
    lines += [f"{pattern(t)}={ty}" for t, ty in types.items()]
    return "\n".join(lines) + "\n"


def pattern(tensor: str) -> str:
    """A regex for exactly `tensor`: llama-quantize regex_searches the (lower-cased) pattern in each
    name, and the escaped dot after the block number keeps blk.1 from matching blk.11."""
    return re.escape(tensor)
