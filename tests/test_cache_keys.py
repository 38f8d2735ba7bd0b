"""A float32 run and a bf16 run of the same settings never share a cached proxy, sensitivity table
or evaluation: dtype and device are in every cache key (tiny random-weight Llama, real HQQ)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from amq.config.compose import evaluation_context
from amq.metrics.divergence import OutputDivergence
from amq.modeling.discovery import discover_layout
from amq.proxy.bank import ProxyBank
from amq.quantizers.hqq_proxy import HQQQuantizer
from amq.search import sensitivity
from amq.search.eval_cache import DiskEvaluationCache

CONFIG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _workbench(dtype: torch.dtype, cache_dir) -> SimpleNamespace:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIG).to(dtype).eval().requires_grad_(False)
    layout = discover_layout(model)
    bank = ProxyBank(model, layout, HQQQuantizer(group_size=32), [3, 8]).build(cache_dir / "proxy", "tiny-llama")
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    metric = OutputDivergence(model, tokens, batch_size=2)
    lm = SimpleNamespace(fingerprint="tiny-llama", model=model, device=torch.device("cpu"))
    return SimpleNamespace(lm=lm, bank=bank, metric=metric, layout=layout)


def test_float32_and_bf16_never_share_a_cache(tmp_path):
    f32, bf16 = _workbench(torch.float32, tmp_path), _workbench(torch.bfloat16, tmp_path)
    assert bf16.bank.cache_hits == 0, "the bf16 proxy reused the float32 one"
    assert len(list((tmp_path / "proxy").glob("*.pt"))) == 4  # 2 widths x 2 dtypes

    contexts = [evaluation_context(wb, wb.metric, sensitivity.measure) for wb in (f32, bf16)]
    assert contexts[0]["dtype"] != contexts[1]["dtype"] and contexts[0]["device"] == "cpu"
    cache = DiskEvaluationCache(str(tmp_path / "evaluations"))
    assert cache.store(contexts[0]).folder != cache.store(contexts[1]).folder

    tables = [sensitivity.cached_measure(wb.bank, wb.metric, tmp_path / "sensitivity", ctx) for wb, ctx in zip((f32, bf16), contexts)]
    assert len(list((tmp_path / "sensitivity").glob("*.json"))) == 2  # measured twice, not reused
    assert tables[0].damage != tables[1].damage

    again = _workbench(torch.float32, tmp_path)  # the same settings do share
    assert again.bank.cache_hits == 2
