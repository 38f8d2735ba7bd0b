"""Prefix reuse: a pass that starts at the first changed decoder block gives the full forward's
value bit for bit, on every layout the discovery supports (tiny random-weight models)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, OPTConfig, Qwen2Config

from amq.metrics.divergence import OutputDivergence
from amq.modeling.discovery import find_decoder_blocks

CONFIGS = {
    "llama": lambda: LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2),
    "qwen2": lambda: Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2),
    "gemma3": lambda: Gemma3TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8
    ),
    "opt": lambda: OPTConfig(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=6, num_attention_heads=4, word_embed_proj_dim=64),
}


def _metric(arch: str, prefix_mb: float = 64.0) -> tuple[OutputDivergence, torch.nn.ModuleList]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch]()).float().eval().requires_grad_(False)
    tokens = torch.randint(0, 256, (5, 24), generator=torch.Generator().manual_seed(1))
    metric = OutputDivergence(model, tokens, batch_size=2, prefix_cache_mb=prefix_mb)
    _, blocks = find_decoder_blocks(model)
    return metric, blocks


def _perturb(blocks: torch.nn.ModuleList, block: int, scale: float) -> None:
    """Change one linear of `block` in place (what a proxy swap does)."""
    linear = next(m for m in blocks[block].modules() if isinstance(m, torch.nn.Linear))
    linear.weight.mul_(scale)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_resumed_passes_equal_full_passes(arch):
    metric, blocks = _metric(arch)
    assert metric.reuse_prefix(blocks), "the check of skipping blocks failed on this layout"
    n = len(blocks)
    states = [0] * n
    assert metric.evaluate(metric.model, states) == metric.evaluate(metric.model)
    for block, scale in [(4, 1.5), (4, 1 / 1.5), (1, 0.5), (5, 3.0), (2, 1.1)]:
        _perturb(blocks, block, scale)
        states = states.copy()
        states[block] += 1
        resumed = metric.evaluate(metric.model, states)
        assert resumed == metric.evaluate(metric.model), (arch, block)  # a pass with no state runs in full
        metric.evaluate(metric.model, states)  # the kept inputs are this state's again
    stats = metric.prefix_stats
    assert stats["blocks_skipped"] > 0 and stats["blocks_run"] > 0


def test_memory_cap_keeps_every_kth_block_or_none():
    metric, blocks = _metric("llama", prefix_mb=0.0)
    assert not metric.reuse_prefix(blocks)  # no room for a single block: every pass runs in full
    per_block_mb = metric.tokens.numel() * 64 * 4 / 2**20
    metric, blocks = _metric("llama", prefix_mb=per_block_mb * 2.5)
    assert metric.reuse_prefix(blocks)
    assert metric._prefix.kept == [3]  # 6 blocks, room for two: every third (block 0 is the embedding)
    states = [0] * 6
    metric.evaluate(metric.model, states)
    _perturb(blocks, 5, 2.0)
    states[5] = 1
    assert metric.evaluate(metric.model, states) == metric.evaluate(metric.model)


def test_subset_takes_exactly_the_asked_windows():
    metric, blocks = _metric("llama")
    sub = metric.subset(3)  # batch size 2: one full batch and half of the next
    assert sub.tokens.shape[0] == 3
    fresh = OutputDivergence(metric.model, metric.tokens[:3], batch_size=2)
    _perturb(blocks, 2, 1.3)
    assert sub.evaluate(sub.model) == pytest.approx(fresh.evaluate(fresh.model), rel=1e-5)
