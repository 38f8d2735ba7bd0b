"""Every run states how much of the decoder it searches, and refuses a model it would quantize only
in part (mixture-of-experts with fused 3-D expert tensors) or not at all (GPT-2's Conv1D layers),
instead of exporting a "4.5-bit" model that keeps most of its weights unquantized."""

from __future__ import annotations

import logging

import pytest
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from amq.config.compose import check_coverage
from amq.errors import ConfigError, InvalidArgument, settings_of
from amq.modeling.discovery import coverage, discover_layout

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256)


def test_a_dense_model_is_covered_whole(caplog):
    model = LlamaForCausalLM(LlamaConfig(**SMALL))
    cov = coverage(model, discover_layout(model))
    assert cov.fraction == 1.0 and not cov.uncovered
    with caplog.at_level(logging.INFO):
        check_coverage("tiny-llama", cov)
    assert "covers 100.0% of tiny-llama's decoder weight matrices" in caplog.text


def test_fused_experts_are_refused_with_what_is_left_out():
    model = MixtralForCausalLM(MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2))
    cov = coverage(model, discover_layout(model))
    assert any(name.endswith("mlp.experts.gate_up_proj") for name in cov.uncovered)
    assert cov.fraction < 0.2  # the attention projections only
    with pytest.raises(ConfigError) as info:
        check_coverage("tiny-mixtral", cov)
    assert info.value.setting == "model" and "mlp.experts" in str(info.value) and "(valid: " in str(info.value)


def test_conv1d_models_are_a_clear_error():
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256))
    with pytest.raises(ConfigError) as info, settings_of("model"):
        discover_layout(model)
    assert info.value.setting == "model" and "Conv1D" in str(info.value)
    assert not isinstance(info.value, InvalidArgument)  # mapped to the setting
