"""`experiment=vllm`: a search whose exported checkpoints vLLM's kernels serve whole (by its source:
amq does not run vLLM), on the real SmolLM2 with the smoke budget. HQQ stands in for the preset's
GPTQ (same export path, no calibration pass), and the session's proxies (fractional zero points)
for the preset's whole-code ones, so that the search reuses the cached 4- and 8-bit proxies and the
4-bit sensitivity table (tests/test_sensitivity_widths.py measures it); the preset's proxy with
whole-code zero points is tested in tests/test_finalize_quantizers.py, the refusals in
tests/test_bad_inputs.py, the finalizers' integer zero points in tests/test_finalize_quantizers.py."""

from __future__ import annotations

import json

import pytest
from conftest import SMOKE, search_in_process
from test_finalize import check_plain_transformers_reproduces


@pytest.mark.slow
def test_the_vllm_preset_exports_every_layer_bit_packed_with_a_vllm_kernel(compose_cfg, plain_python, tmp_path):
    overrides = [o for o in SMOKE if o != "finalize.enabled=false"]
    overrides += ["experiment=vllm", "finalizer=hqq", "finalize.targets=[5.0]", "finalize.baselines=false", "finalize.extra_front_points=0"]
    assert compose_cfg(overrides).quantizer.integer_zero is True  # the preset's own proxy...
    overrides += ["finalize.window=256", "finalize.max_windows=1", "quantizer.integer_zero=false"]  # ...and the session's cached one here
    search_in_process(overrides, tmp_path / "run")
    (run,) = [p for p in (tmp_path / "run").rglob("summary.json")]
    model = run.parent / "models" / "5"
    bits = json.loads((model / "bit_config.json").read_text())["bits"]
    assert set(bits.values()) <= {4, 8} and len(set(bits.values())) == 2  # a real mix of the two widths
    for block in {n.rsplit(".", 2)[0] for n in bits}:  # model.layers.<i>: the sets vLLM fuses share one width
        for siblings in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")):
            assert len({bits[f"{block}.{s}"] for s in siblings}) == 1, (block, siblings)
    groups = json.loads((model / "compressed-tensors" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert {g["format"] for g in groups.values()} == {"pack-quantized"}, groups
    assert json.loads((model / "amq_quant.json").read_text())["quantizer"]["integer_zero"] is True
    card = (model / "README.md").read_text()
    assert "every group has a kernel" in card and "vllm serve" in card and "naive-quantized" not in card
    check_plain_transformers_reproduces(plain_python, run.parent, ["5"], tmp_path)  # bit-packed, and still eval.json's perplexity
