"""amq-export: compressed-tensors checkpoints from amq model directories already written, and a
clean refusal (one line, exit 2, nothing written) of what it cannot convert."""

from __future__ import annotations

import json

import torch
from test_compressed_tensors import CONFIG, GROUP, _quants, _tokenizer
from transformers import LlamaForCausalLM

from amq.bits import BitConfig
from amq.cli.export import main
from amq.quantizers.export import write_model_dir
from amq.quantizers.grid import rtn_quant
from amq.quantizers.packed import replace_linears


def _amq_dir(path, kind: str = "hqq", awq: bool = False):
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG).eval().requires_grad_(False)
    quants = _quants(model, kind)
    if awq:  # what AWQ leaves on a layer: a per-input-channel scale
        name = next(iter(quants))
        quants[name] = rtn_quant(model.get_submodule(name).weight, 4, GROUP)
        quants[name].input_scale = torch.ones(quants[name].shape[1], dtype=torch.float16)
    replace_linears(model, quants, torch.float32)
    return write_model_dir(path, model, _tokenizer(), BitConfig({n: q.bits for n, q in quants.items()}, GROUP), {"name": kind})


def _errors(caplog) -> list[str]:
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    caplog.clear()
    return errors


def test_a_run_directory_gets_a_checkpoint_per_model(tmp_path):
    run = tmp_path / "run"
    for target, kind in (("4", "hqq"), ("4.5", "int-zero")):
        _amq_dir(run / "models" / target, kind)
    assert main([str(run)]) == 0
    for target, fmt in (("4", "naive-quantized"), ("4.5", "pack-quantized")):
        config = json.loads((run / "models" / target / "compressed-tensors" / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == "compressed-tensors"
        assert {g["format"] for g in config["quantization_config"]["config_groups"].values()} == {fmt}


def test_bad_requests_are_one_line_and_write_nothing(tmp_path, caplog):
    model = _amq_dir(tmp_path / "m")
    awq = _amq_dir(tmp_path / "awq", awq=True)
    caplog.clear()
    for args, setting in (
        ([str(model), "--format", "onnx"], "--format"),
        ([str(tmp_path / "nowhere")], "path"),
        ([str(awq)], "path"),
    ):
        before = sorted(p.name for p in tmp_path.rglob("*"))
        assert main(args) == 2
        errors = _errors(caplog)
        assert len(errors) == 1 and errors[0].startswith(f"{setting}:") and "(valid: " in errors[0], errors
        assert sorted(p.name for p in tmp_path.rglob("*")) == before, "a refused export wrote something"
