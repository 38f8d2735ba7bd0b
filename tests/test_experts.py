"""Mixture-of-experts weights as per-expert nn.Linear layers (amq.modeling.experts): the same
outputs as transformers' fused experts, for every experts layout transformers 5 has (gated,
biased and transposed: gpt-oss), one gene per projection by default, and calibration that gives
each expert the tokens routed to it."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from amq.modeling.discovery import discover_layout
from amq.modeling.experts import ExpertLinears
from amq.modeling.normalize import as_linear_layers, needs_linear_layers
from amq.quantizers.calibration import InputStats, quantize_blocks
from amq.quantizers.grid import rtn_quant
from amq.quantizers.packed import GroupQuant
from amq.search.space import SearchSpace

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
MOE = {
    "mixtral": (T.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2-moe": (T.Qwen2MoeConfig, dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=128)),
    "qwen3-moe": (T.Qwen3MoeConfig, dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, head_dim=16)),
    "gpt-oss (biased, transposed)": (T.GptOssConfig, dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16)),
}
IDS = torch.arange(3, 67).view(2, 32)


def _model(name: str) -> torch.nn.Module:
    config_cls, extra = MOE[name]
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(config_cls(**BASE, **extra)).eval().requires_grad_(False)


@pytest.mark.parametrize("name", list(MOE))
def test_per_expert_linears_compute_what_the_fused_experts_compute(name):
    model = _model(name)
    assert needs_linear_layers(model)
    with torch.no_grad():
        before = model(input_ids=IDS).logits
    assert as_linear_layers(model)["experts"] == 2
    assert not needs_linear_layers(model)
    with torch.no_grad():
        after = model(input_ids=IDS).logits
    assert float((before - after).abs().max()) < 1e-5
    experts = [m for m in model.modules() if isinstance(m, ExpertLinears)]
    assert len(experts) == 2 and all(len(e) == 4 for e in experts)
    assert not any(p.dim() == 3 for p in model.parameters())  # the fused tensors are gone, not kept beside


def test_one_gene_per_projection_of_a_layers_experts_unless_asked_per_expert():
    model = _model("qwen2-moe")
    as_linear_layers(model)
    layout = discover_layout(model)
    experts = [li for li in layout.linears if li.expert is not None]
    assert len(experts) == 2 * 4 * 2  # blocks x experts x (gate_up, down)
    assert "model.layers.0.mlp.shared_expert_gate" not in layout.names  # a router: 16 bits, not searched
    assert "model.layers.0.mlp.shared_expert.up_proj" in layout.names  # the shared expert is searched like an MLP
    by_projection = SearchSpace(layout.linears, [2, 3, 4], 32)
    per_expert = SearchSpace(layout.linears, [2, 3, 4], 32, expert_genes="expert")
    assert per_expert.n_genes - by_projection.n_genes == 2 * 2 * (4 - 1)
    group = next(g for g in by_projection.groups if "model.layers.1.mlp.experts.0.down_proj" in g)
    assert group == [f"model.layers.1.mlp.experts.{e}.down_proj" for e in range(4)]
    uniform4 = by_projection.avg_bits(by_projection.uniform(4))
    assert uniform4 == pytest.approx(4 + by_projection.meta_bits)  # every searched weight at 4 bits, experts included


def test_each_expert_is_calibrated_on_the_tokens_routed_to_it():
    model = _model("mixtral")
    as_linear_layers(model)
    layout = discover_layout(model)
    linears = [li for li in layout.linears if li.expert is not None and li.block == 0]
    seen: dict[str, int] = {}

    def stage(names: list[str], weights: list[torch.Tensor], stats: InputStats) -> list[GroupQuant]:
        seen.update(dict.fromkeys(names, stats.count))
        return [rtn_quant(w, 4, 32) for w in weights]

    calib = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    quantize_blocks(model, linears, calib, stage, batch_size=2, sequential=False)
    routed = {e: 0 for e in range(4)}
    block = model.model.layers[0]

    def count(module: torch.nn.Module, args: tuple) -> None:
        for e in range(4):
            routed[e] += int((args[1] == e).sum())

    hook = block.mlp.experts.register_forward_pre_hook(count)
    with torch.no_grad():
        model(input_ids=calib)
    hook.remove()
    assert sum(routed.values()) == 2 * 16 * 2  # tokens x experts per token
    for li in linears:
        assert seen[li.name] == (routed[li.expert] or 1), li.name  # 1: uncalibrated (no token reached it)


def test_a_layers_experts_are_measured_in_one_rerun_per_projection():
    """Sequential calibration re-runs a block to measure each stage's inputs after the earlier
    stages were quantized; the experts of one projection share that re-run."""
    model = _model("mixtral")
    as_linear_layers(model)
    layout = discover_layout(model)
    linears = [li for li in layout.linears if li.block == 0]
    block = model.model.layers[0]
    runs = []
    hook = block.register_forward_pre_hook(lambda m, a: runs.append(1))
    stages: list[list[str]] = []

    def stage(names: list[str], weights: list[torch.Tensor], stats: InputStats) -> list[GroupQuant]:
        stages.append(names)
        return [rtn_quant(w, 4, 32) for w in weights]

    calib = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    quants = quantize_blocks(model, linears, calib, stage, batch_size=2, sequential=True)
    hook.remove()
    assert set(quants) == {li.name for li in linears}
    expert_stages = [s for s in stages if ".experts." in s[0]]
    assert [s[0].rsplit(".", 1)[1] for s in expert_stages] == ["gate_up_proj"] * 4 + ["down_proj"] * 4  # projection by projection
    # one batch: the capture of the block's inputs, the first pass, then re-runs for o_proj, the
    # experts' gate_up and their down_proj (one re-run per expert stage would make 11)
    assert len(runs) == 5
