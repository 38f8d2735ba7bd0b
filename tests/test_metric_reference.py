"""The metric's two reference storages give the same divergence; a model they don't fit is refused."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from amq.errors import ConfigError
from amq.metrics.divergence import OutputDivergence
from amq.modeling.random_init import random_llama


def _perturbed_copy_metric(model, tokens, **kw) -> tuple[float, float]:
    """JSD of a perturbed model against the original, with the reference as probs and as hidden states."""
    probs = OutputDivergence(model, tokens, batch_size=2, chunk_tokens=16, **kw)
    hidden = OutputDivergence(model, tokens, batch_size=2, chunk_tokens=16, reference="hidden", **kw)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.model.layers[0].parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen).to(p.dtype))
    return probs.evaluate(model), hidden.evaluate(model)


@pytest.mark.parametrize("kind", ["jsd", "kl"])
def test_hidden_reference_matches_probs_on_llama(kind):
    model = random_llama("tiny", "cpu", dtype=torch.float32)
    tokens = torch.randint(0, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(1))
    via_probs, via_hidden = _perturbed_copy_metric(model, tokens, kind=kind)
    assert via_probs > 1e-4  # the perturbation is visible
    assert via_hidden == pytest.approx(via_probs, rel=1e-4)


def test_hidden_reference_applies_the_final_softcap():
    """Gemma-style models soft-cap their logits after the head; the hidden path must do the same."""
    config = Gemma3TextConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        vocab_size=256,
        final_logit_softcapping=0.1,
        sliding_window=16,
    )
    model = Gemma3ForCausalLM(config).eval().requires_grad_(False)
    tokens = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(2))
    via_probs, via_hidden = _perturbed_copy_metric(model, tokens)
    assert via_probs > 1e-6
    assert via_hidden == pytest.approx(via_probs, rel=1e-4)


def test_hidden_reference_refuses_a_model_whose_logits_are_not_head_of_hidden():
    model = random_llama("tiny", "cpu", dtype=torch.float32)
    model.config.final_logit_softcapping = 0.01  # Llama's forward ignores it; the hidden path would apply it
    tokens = torch.randint(0, model.config.vocab_size, (2, 16))
    with pytest.raises(ConfigError, match="^reference: hidden: "):
        OutputDivergence(model, tokens, reference="hidden")


def test_unknown_reference_is_a_config_error():
    model = random_llama("tiny", "cpu")
    with pytest.raises(ConfigError, match="^reference: .*probs, hidden"):
        OutputDivergence(model, torch.zeros(1, 8, dtype=torch.long), reference="logits")
