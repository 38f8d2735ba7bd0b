"""Models of published architectures with random weights, for speed measurements and layout checks.

Timing does not depend on weight values, so a model built from an architecture's config.json
with random weights measures what the real one costs, with no download. Created directly on the
target device, so host memory is never the limit.

`RandomArchitecture` is a model source (`model=random`, conf/model/random.yaml) like those of
amq.modeling.loading: a preset of `PRESETS` built with the SmolLM2 tokenizer the project ships
offline, so the whole pipeline runs on it. Every quality number it yields is meaningless.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from amq.errors import InvalidArgument, require_at_least
from amq.modeling.loading import LoadedModel, _device_and_dtype, _finish, _wants_bos

log = logging.getLogger(__name__)

# Llama-family shapes as published in each model's config.json, and a tiny one for tests
# (random_llama; scripts/bench_gpu.py).
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

# Tiny presets leave vocab_size out: the source sets it to the tokenizer's size, so every token id
# is valid (build_model without one keeps the config class's default).
_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=2048)
_TINY_GQA = dict(_TINY, intermediate_size=128, num_key_value_heads=2)
_TINY_MOE = dict(_TINY_GQA, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1, mlp_only_layers=[])

# preset -> (transformers model_type, config arguments). Full-size shapes as published in each
# model's config.json; tiny ones (configs of tests/test_architectures.py) for tests.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-llama": ("llama", _TINY_GQA),
    "tiny-mistral": ("mistral", _TINY_GQA),
    "tiny-qwen2": ("qwen2", _TINY_GQA),
    "tiny-qwen3": ("qwen3", dict(_TINY_GQA, head_dim=16)),
    "tiny-gemma3": ("gemma3_text", dict(_TINY_GQA, head_dim=16)),
    "tiny-phi3": ("phi3", dict(_TINY_GQA, pad_token_id=0)),
    "tiny-opt": ("opt", dict(_TINY, ffn_dim=128, word_embed_proj_dim=64)),
    "tiny-gpt2": ("gpt2", dict(n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=2048)),
    "tiny-gpt-neox": ("gpt_neox", dict(_TINY, intermediate_size=128)),
    "tiny-falcon": ("falcon", dict(_TINY, ffn_hidden_size=128)),
    "tiny-mixtral": ("mixtral", dict(_TINY_GQA, num_local_experts=4, num_experts_per_tok=2)),
    "tiny-qwen2-moe": ("qwen2_moe", dict(_TINY_MOE, shared_expert_intermediate_size=128)),
    "tiny-qwen3-moe": ("qwen3_moe", dict(_TINY_MOE, head_dim=16)),
    "llama2-7b": ("llama", ARCHS["llama2-7b"]),
    "llama3-8b": ("llama", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
    )),
    "qwen2.5-7b": ("qwen2", dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        vocab_size=152064, max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
    )),
}
# fmt: on

# The tokenizer every preset is run with: the embedded SmolLM2 source, as its config option builds
# it (this file's place in the checkout, as amq.config.compose.CONF_DIR finds conf/).
TOKENIZER_SOURCE = Path(__file__).resolve().parents[2] / "conf" / "model" / "smollm2.yaml"

SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")  # taken from the tokenizer, so the config agrees with it


def _plain(value: Any) -> Any:
    """Plain dicts and lists for OmegaConf containers (Hydra passes overrides as DictConfig)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    return value


def preset_kwargs(arch: str, overrides: Mapping[str, Any] | None = None, tokenizer: PreTrainedTokenizerBase | None = None) -> tuple[str, dict[str, Any]]:
    """(model_type, config arguments) of preset `arch`, fitted to `tokenizer` (its special token
    ids, and at least its number of ids: a larger id would index past the embedding), then
    `overrides` applied."""
    if arch not in PRESETS:
        raise InvalidArgument("arch", f"unknown architecture preset {arch!r}", ", ".join(sorted(PRESETS)))
    if overrides is not None and not isinstance(overrides, Mapping):
        raise InvalidArgument("overrides", f"{overrides!r} is not a mapping", "a mapping of config arguments, e.g. {num_hidden_layers: 4}, or null")
    model_type, base = PRESETS[arch]
    kwargs = dict(base)
    if tokenizer is not None:
        kwargs.update({key: value for key in SPECIAL_IDS if (value := getattr(tokenizer, key, None)) is not None})
    kwargs = _plain({**kwargs, **(overrides or {})})
    n_ids = len(tokenizer) if tokenizer is not None else 0
    vocab = kwargs.get("vocab_size")
    if vocab is None and n_ids:
        kwargs["vocab_size"] = n_ids
    elif vocab is not None and vocab < n_ids:
        log.warning(
            "%s: vocab_size raised from %d to %d so that every id of the tokenizer is valid (embedding and lm_head larger than published)", arch, vocab, n_ids
        )
        kwargs["vocab_size"] = n_ids
    return model_type, kwargs


def _instantiate(model_type: str, kwargs: Mapping[str, Any], device: torch.device | str, dtype: torch.dtype, seed: int | None) -> PreTrainedModel:
    """The model of `model_type` with these config arguments, created on `device` (no copy through
    host memory); `seed` makes its weights deterministic (None: the current RNG state)."""
    try:
        config = AutoConfig.for_model(model_type, **kwargs)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument("overrides", f"the {model_type} config refuses these arguments ({str(exc).splitlines()[0]})") from None
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)


def build_model(
    arch: str,
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    overrides: Mapping[str, Any] | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> PreTrainedModel:
    """Preset `arch` with random weights (seeded), created on `device` (`meta` for shapes only), in
    eval mode without grads; see preset_kwargs for `overrides` and `tokenizer`."""
    model_type, kwargs = preset_kwargs(arch, overrides, tokenizer)
    return _instantiate(model_type, kwargs, device, dtype, seed)


def random_llama(arch: str, device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> LlamaForCausalLM:
    """`arch` (a key of ARCHS) with random weights, created on `device`, in eval mode without grads."""
    if arch not in ARCHS:
        raise InvalidArgument("arch", f"unknown architecture {arch!r}", ", ".join(ARCHS))
    return _instantiate("llama", ARCHS[arch], device, dtype, seed=None)


def shipped_tokenizer(cache_dir: Path) -> PreTrainedTokenizerBase:
    """The SmolLM2 tokenizer shipped offline, read from the safetensors directory its model source
    caches; the first call converts the GGUF (once, as `model=smollm2` would) and reuses the result."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    source = instantiate(OmegaConf.load(TOKENIZER_SOURCE).source, device="cpu", dtype="float32")
    converted, _ = source.converted_dir(cache_dir)
    if (converted / "config.json").is_file():
        return AutoTokenizer.from_pretrained(converted)
    return source.load(cache_dir).tokenizer


@dataclass
class RandomArchitecture:
    """A preset of `PRESETS` with random weights (seeded) and the embedded SmolLM2 tokenizer: timing
    at scale and architecture checks with no download. Its quality numbers mean nothing.

    `overrides` are more config arguments (e.g. {num_hidden_layers: 4}). Tiny presets take the
    tokenizer's vocabulary; full-size ones keep their published one unless it is smaller.
    `tokenizer`, a local directory (or hub id) holding a tokenizer, replaces the shipped one, e.g.
    on a machine where the embedded GGUF is not installed."""

    arch: str
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    add_bos: bool | None = None
    overrides: dict | None = None
    tokenizer: str | None = None

    def _tokenizer(self, cache_dir: Path) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            return shipped_tokenizer(cache_dir)
        try:
            return AutoTokenizer.from_pretrained(self.tokenizer)
        except (OSError, ValueError) as exc:
            raise InvalidArgument(
                "tokenizer", f"cannot load a tokenizer from {self.tokenizer!r} ({str(exc).splitlines()[0]})", "a directory holding tokenizer.json, or null"
            ) from None

    def load(self, cache_dir: str | Path) -> LoadedModel:
        device, compute = _device_and_dtype(self.device, self.dtype)
        require_at_least(self, "seed", 0)
        preset_kwargs(self.arch, self.overrides)  # a bad preset fails before the tokenizer loads
        tokenizer = self._tokenizer(Path(cache_dir))
        model_type, kwargs = preset_kwargs(self.arch, self.overrides, tokenizer)
        t0 = time.perf_counter()
        model = _instantiate(model_type, kwargs, device, compute.dtype, self.seed)
        identity = {"arch": self.arch, "seed": self.seed, "model_type": model_type, "config": kwargs, "dtype": compute.name, "device": device.type}
        fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
        name = f"random-{self.arch}"
        n_params = sum(p.numel() for p in model.parameters())
        log.info(
            "built %s (%s, %.3g parameters, seed %d; %s: %s) in %.1fs",
            name,
            model_type,
            n_params,
            self.seed,
            compute.name,
            compute.reason,
            time.perf_counter() - t0,
        )
        log.warning(
            "%s has random weights: every quality number of this run (divergence, perplexity, accuracy) is meaningless; only timings and the mechanics mean something",
            name,
        )
        return LoadedModel(_finish(model, device), tokenizer, name, fingerprint, _wants_bos(tokenizer, self.add_bos), device, compute)
