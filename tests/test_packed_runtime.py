"""The two runtimes of a reloaded model, and re-evaluation that keeps what it did not re-measure.

A real SmolLM2 with its first two blocks quantized (round-to-nearest, 3 and 4 bits) is exported
once; the tests reload it and run `amq-evaluate` in process on the real held-out text.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import SMOKE, run_script

from amq.bits import BitConfig
from amq.cli.evaluate import main as evaluate_main
from amq.config.compose import build
from amq.errors import ConfigError
from amq.modeling.discovery import discover_layout
from amq.quantizers.export import load_quantized, write_model_dir
from amq.quantizers.grid import rtn_quant
from amq.quantizers.packed import PackedLinear, replace_linears, resident_bytes, set_runtime

GROUP = 64


@pytest.fixture(scope="module")
def model_dir(compose_cfg, tmp_path_factory) -> Path:
    cfg = compose_cfg(["model=smollm2", *SMOKE])
    lm = build(cfg.model.source, "model").load(Path(cfg.paths.cache_dir))
    bits = {li.name: 3 + li.block for li in discover_layout(lm.model).linears if li.block < 2}
    packed = copy.deepcopy(lm.model)
    quants = {n: rtn_quant(lm.model.get_submodule(n).weight.detach(), b, GROUP) for n, b in bits.items()}
    replace_linears(packed, quants, lm.model.dtype)
    return write_model_dir(tmp_path_factory.mktemp("export") / "m", packed, lm.tokenizer, BitConfig(bits, GROUP), {"name": "rtn"})


def _tokens() -> torch.Tensor:
    return torch.arange(100, 164).view(1, -1)


def test_packed_runtime_gives_identical_outputs_and_keeps_no_dequantized_weight(model_dir):
    fast, small = load_quantized(model_dir), load_quantized(model_dir, runtime="packed")
    with torch.no_grad():
        a, b = fast(input_ids=_tokens()).logits.float(), small(input_ids=_tokens()).logits.float()
        small(input_ids=_tokens())  # a second call unpacks again, it does not start caching
    assert float((a - b).abs().max()) < 1e-2 * float(a.abs().max())  # same weights; matmuls may block differently
    layers = [m for m in small.modules() if isinstance(m, PackedLinear)]
    kept = {n: m._dequantized for n, m in fast.named_modules() if isinstance(m, PackedLinear)}
    assert len(layers) == len(kept) == 14 and all(m._dequantized is None for m in layers)
    for name, m in ((n, m) for n, m in small.named_modules() if isinstance(m, PackedLinear)):
        assert torch.equal(m.weight_float().to(kept[name].dtype), kept[name])  # the packed runtime rebuilds the very same weight
    saved = resident_bytes(fast) - resident_bytes(small)
    kept_bytes = sum(w.numel() * w.element_size() for w in kept.values())  # bf16 or float32: the model's compute dtype
    assert saved == kept_bytes  # exactly the kept dequantized weights, nothing else differs


def test_unknown_runtime_is_a_config_error(model_dir):
    with pytest.raises(ConfigError, match="runtime"):
        load_quantized(model_dir, runtime="int4")


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
def test_reevaluation_keeps_zero_shot_results_and_recorded_threads(model_dir, keep_threads, bigbench_tasks):
    common = ["--window", "128", "--max-windows", "1"]
    assert evaluate_main([str(model_dir), *common, "--threads", "1", "--tasks", "bigbench_social_iqa", "--task-limit", "4"]) == 0
    first = json.loads((model_dir / "eval.json").read_text())
    assert first["zero_shot"]["bigbench_social_iqa"]["n"] == 4
    assert first["zero_shot"]["bigbench_social_iqa"]["limit"] == 4
    assert first["environment"]["threads"] == 1
    # perplexity again, packed runtime, no --threads: the recorded thread count is used, so the
    # bf16 sums round as before and the perplexity is reproduced exactly; zero-shot is carried over
    torch.set_num_threads(2)
    assert evaluate_main([str(model_dir), *common, "--runtime", "packed"]) == 0
    second = json.loads((model_dir / "eval.json").read_text())
    assert second["zero_shot"] == first["zero_shot"]
    assert second["environment"]["threads"] == 1
    assert all(r["rel_diff"] == 0.0 for r in second["reproduction"].values())


def test_a_changed_environment_is_named_when_numbers_move():
    from amq.cli.evaluate import environment_change

    recorded = {"device": "cpu", "threads": 2, "torch": "2.13.0"}
    assert environment_change(recorded, dict(recorded)) == ""
    assert "threads 2 -> 8" in environment_change(recorded, {**recorded, "threads": 8})


def test_compiled_dequantization_gives_the_same_outputs():
    g = torch.Generator().manual_seed(0)
    layer = PackedLinear.from_quant(rtn_quant(torch.randn(96, 2 * GROUP, generator=g), 3, GROUP), None, torch.bfloat16)
    x = torch.randn(2, 5, 2 * GROUP, generator=g).to(torch.bfloat16)
    eager = layer(x)
    set_runtime(layer, "packed", compile=True)
    assert torch.equal(layer(x), eager) and layer._dequantized is None


@pytest.mark.slow
@pytest.mark.heavy  # make test-all: a benchmark script's smoke run; the runtimes' outputs are compared by the tests above
def test_bench_runtime_compares_both_runtimes(model_dir):
    proc = run_script("bench_runtime.py", [str(model_dir), "--window", "32", "--decode", "2", "--repeats", "1", "--threads", "2"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.split("\n\n| runtime")[0])
    assert result["same_tokens"] is True and result["max_abs_logit_diff"] < 0.1
    assert result["packed_over_dequantized"]["linear_bytes"] < 0.5


@pytest.mark.slow
def test_reevaluations_are_kept_and_an_environment_change_is_reported_not_failed(model_dir, keep_threads, tmp_path):
    common = ["--window", "128", "--max-windows", "1", "--threads", "2"]
    text = tmp_path / "news.txt"
    text.write_text("\n\n".join(f"Story {i}: the council met on Tuesday and voted on the new budget for the harbour." * 8 for i in range(6)))
    assert evaluate_main([str(model_dir), *common]) == 0
    first = json.loads((model_dir / "eval.json").read_text())
    assert evaluate_main([str(model_dir), *common, "--data", str(text)]) == 0  # another text
    second = json.loads((model_dir / "eval.json").read_text())
    assert set(second["perplexity"]) == {"news"} and "reproduction" not in second
    assert second["history"][-1]["perplexity"] == first["perplexity"]  # the first result is kept
    assert evaluate_main([str(model_dir), *common]) == 0  # the first text again: compared with its own earlier result
    third = json.loads((model_dir / "eval.json").read_text())
    assert set(third["reproduction"]) == set(first["perplexity"]) and len(third["history"]) == len(first.get("history", [])) + 2
    # an earlier result 1% off: a failure in the same environment, a report in another
    tampered = {**third, "perplexity": {k: {**v, "perplexity": v["perplexity"] * 1.01} for k, v in third["perplexity"].items()}, "history": []}
    (model_dir / "eval.json").write_text(json.dumps(tampered))
    assert evaluate_main([str(model_dir), *common]) == 1
    other = {**tampered, "environment": {**tampered["environment"], "torch": "0.0"}}
    (model_dir / "eval.json").write_text(json.dumps(other))
    assert evaluate_main([str(model_dir), *common]) == 0
    last = json.loads((model_dir / "eval.json").read_text())
    assert last["same_environment"] is False and any(r["rel_diff"] > 5e-3 for r in last["reproduction"].values())
