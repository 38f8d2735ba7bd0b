"""Layout discovery on the real transformers classes (tiny random configs, no download)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

from amq.modeling.discovery import discover_layout

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize(
    "config, blocks_name, per_block",
    [
        (LlamaConfig(**SMALL), "model.layers", 7),
        (MistralConfig(**SMALL), "model.layers", 7),
        (Qwen2Config(**SMALL), "model.layers", 7),
        (Gemma3TextConfig(**SMALL, head_dim=16), "model.layers", 7),
        (OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4, word_embed_proj_dim=64), "model.decoder.layers", 6),
    ],
    ids=["llama", "mistral", "qwen2", "gemma3", "opt"],
)
def test_discovers_blocks_and_linears(config, blocks_name, per_block):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    layout = discover_layout(model)
    assert layout.blocks_name == blocks_name
    assert layout.n_blocks == 3
    assert len(layout.linears) == 3 * per_block
    for li in layout.linears:
        mod = model.get_submodule(li.name)
        assert isinstance(mod, torch.nn.Linear)
        assert (mod.in_features, mod.out_features) == (li.in_features, li.out_features)
    assert "lm_head" not in layout.names
