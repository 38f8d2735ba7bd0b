"""The architecture matrix end to end: every layout users bring, as a `model=random` preset, runs a
smoke search with finalize through the real config, and its exported model reloads in a fresh
`amq-evaluate` and reproduces the perplexity its eval.json recorded. Mixture-of-experts presets go
through GPTQ or AWQ, so each expert is calibrated on the tokens routed to it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SMOKE, search_in_process

from amq.bits import meta_overhead
from amq.cli import evaluate

GROUP = 64  # conf/space/random.yaml
ONLY_AMQ_FORMAT = {"tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe", "tiny-gpt2"}  # no compressed-tensors checkpoint
MOE = {"tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe"}
LLAMA_CPP = {"tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma3", *MOE}  # llama.cpp names their linears
MATRIX = {  # preset -> finalizer (each calibrated method meets experts at least once)
    "tiny-llama": "hqq",
    "tiny-mistral": "awq",
    "tiny-qwen2": "gptq",
    "tiny-qwen3": "hqq",
    "tiny-gemma3": "awq",
    "tiny-phi3": "gptq",
    "tiny-opt": "hqq",
    "tiny-gpt2": "gptq",
    "tiny-gpt-neox": "awq",
    "tiny-falcon": "hqq",
    "tiny-mixtral": "gptq",
    "tiny-qwen2-moe": "awq",
    "tiny-qwen3-moe": "gptq",
}
FAST = ["budget.iterations=1", "predictor=rbf", "search.targets=[4.0]", "finalize.enabled=true", "finalize.extra_front_points=0"]


@pytest.mark.parametrize("arch", list(MATRIX))
def test_smoke_search_with_finalize_reloads_and_reproduces(arch: str, tmp_path: Path):
    run = tmp_path / "run"
    summary, _ = search_in_process([*SMOKE, *FAST, "model=random", f"model.source.arch={arch}", f"finalizer={MATRIX[arch]}"], run)
    assert summary["model"]["searched_fraction"] >= 0.99
    assert summary["evaluations"]["failed"] == 0
    model_dir = run / "models" / "4"
    assert (model_dir / "eval.json").is_file()
    assert (model_dir / "compressed-tensors").is_dir() == (arch not in ONLY_AMQ_FORMAT)
    types = model_dir / "llama_cpp_tensor_types.txt"
    assert types.is_file() == (arch in LLAMA_CPP)
    if arch in MOE:  # a block's experts: one fused tensor per projection (search.expert_genes=projection)
        assert "ffn_gate_exps" in types.read_text() and "experts" not in types.read_text()
    rows = json.loads((run / "evaluation.json").read_text())["rows"]
    for row in rows:
        if row["kind"] == "uniform":  # every searched weight at one width: that width plus scale/zero
            assert row["avg_bits"] - row["avg_bits_weights_only"] == pytest.approx(meta_overhead(GROUP))
            assert row["avg_bits_weights_only"] == pytest.approx(round(row["avg_bits_weights_only"]))
    assert evaluate.main([str(run), "--threads", "2"]) == 0
    reproduction = json.loads((model_dir / "eval.json").read_text())["reproduction"]
    assert reproduction and all(x["rel_diff"] < 1e-3 for x in reproduction.values()), reproduction
