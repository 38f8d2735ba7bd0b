"""Every run states how much of the decoder it searches. Mixture-of-experts layers (fused 3-D expert
tensors in transformers 5) and GPT-2's Conv1D layers become nn.Linear layers and are searched
whole; routers stay in 16 bits. A model whose searched linears would hold less than
`search.min_coverage` of its decoder weights is refused in one line, unless that setting accepts it."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from amq.config.compose import check_coverage
from amq.errors import ConfigError
from amq.modeling.discovery import coverage, discover_layout
from amq.modeling.normalize import as_linear_layers

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256)


def _mixtral() -> MixtralForCausalLM:
    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2)).eval()


def test_a_dense_model_is_covered_whole(caplog):
    model = LlamaForCausalLM(LlamaConfig(**SMALL))
    cov = coverage(model, discover_layout(model))
    assert cov.fraction == 1.0 and not cov.uncovered
    with caplog.at_level(logging.INFO):
        check_coverage("tiny-llama", cov)
    assert "covers 100.0% of tiny-llama's decoder weight matrices" in caplog.text


def test_experts_are_searched_and_only_routers_are_left_out(caplog):
    model = _mixtral()
    as_linear_layers(model)
    cov = coverage(model, discover_layout(model))
    assert set(cov.uncovered) == {f"model.layers.{i}.mlp.gate.weight" for i in range(2)}
    assert cov.fraction > 0.99
    with caplog.at_level(logging.INFO):
        check_coverage("tiny-mixtral", cov)
    assert "kept in 16 bits" in caplog.text and "mlp.gate.weight" in caplog.text


def test_fused_experts_left_fused_are_refused_unless_accepted():
    model = _mixtral()  # not normalized: the experts stay 3-D tensors no linear holds
    cov = coverage(model, discover_layout(model))
    assert any(name.endswith("mlp.experts.gate_up_proj") for name in cov.uncovered)
    assert cov.fraction < 0.2  # the attention projections only
    with pytest.raises(ConfigError) as info:
        check_coverage("tiny-mixtral", cov)
    assert info.value.setting == "model" and "mlp.experts" in str(info.value) and "search.min_coverage" in str(info.value)
    check_coverage("tiny-mixtral", cov, min_coverage=0.1)  # accepted knowingly


def test_conv1d_layers_are_searched_as_linears():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256)).eval()
    ids = torch.arange(3, 35).view(1, 32)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    assert as_linear_layers(model) == {"experts": 0, "conv1d": 8}
    with torch.no_grad():
        after = model(input_ids=ids).logits
    layout = discover_layout(model)
    assert [li.role for li in layout.linears[:4]] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert coverage(model, layout).fraction == 1.0
    assert float((before - after).abs().max()) < 1e-5
