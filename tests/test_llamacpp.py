"""llama.cpp plans: GGUF names for every family llama.cpp names alike, types each tensor's row
length allows, and the refusals of the script and of `amq-export --format gguf` (exit 2, one line,
nothing written). Fast: no build.

The tests that need the built tools (`heavy`) convert tiny random models with llama.cpp's own
converter and quantize them with the plan; they skip when no build is cached.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config, Qwen3Config

from amq.bits import BitConfig
from amq.errors import InvalidArgument
from amq.llamacpp import gguf_plan
from amq.llamacpp.build import DEFAULT_VERSION, locate
from amq.modeling.discovery import discover_layout
from amq.quantizers import llamacpp
from amq.quantizers.export import BITCONFIG_FILE, read_bit_config
from tests.conftest import load_script, main_in_process

# hidden 576 as SmolLM2 (rows of q/k/v/gate/up not a multiple of 256), ffn 512 (down_proj's rows are)
SHAPES = dict(vocab_size=256, hidden_size=576, intermediate_size=512, num_hidden_layers=2, num_attention_heads=9, num_key_value_heads=3)
CONFIGS = {
    "llama": LlamaConfig(**SHAPES),
    "qwen2": Qwen2Config(**SHAPES),
    "gemma3": Gemma3TextConfig(**{**SHAPES, "hidden_size": 640, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256}),
}
ROLE_OF = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}


def _tiny(config) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def _mixed(names: list[str], widths: tuple[int, ...] = (3, 4, 8)) -> BitConfig:
    return BitConfig({n: widths[i % len(widths)] for i, n in enumerate(names)}, 64)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_every_decoder_linear_gets_its_gguf_name_and_a_type_its_rows_allow(family):
    model = _tiny(CONFIGS[family])
    layout = discover_layout(model)
    assert gguf_plan.architecture(model.config.model_type)
    rows = gguf_plan.row_lengths(layout.linears)
    config = _mixed(layout.names)
    choices = gguf_plan.plan(config, rows)
    assert len(choices) == len(layout.linears) == 14
    for c in choices:
        (module,) = c.modules
        block, role = re.match(r"model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$", module).groups()
        assert c.tensor == f"blk.{block}.{ROLE_OF[role]}.weight"
        row = model.get_submodule(module).in_features
        assert c.row_length == row
        needed = 256 if c.ggml_type.endswith("_K") else 32
        assert row % needed == 0, (c, row)
        assert c.ggml_type == (c.preferred if row % 256 == 0 else gguf_plan.ggml_type(c.bits, row))
    # the finalize stage's public API gives the same types
    assert llamacpp.tensor_types(config, rows) == {c.tensor: c.ggml_type for c in choices}
    assert family in llamacpp.LLAMA_CPP_ARCHITECTURES or model.config.model_type in llamacpp.LLAMA_CPP_ARCHITECTURES


def test_types_follow_the_row_length():
    # 256-multiple rows: each width's K-quant; 8 bits q8_0
    assert [gguf_plan.ggml_type(b, 1536) for b in (2, 3, 4, 5, 6, 8)] == ["q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "q8_0"]
    # SmolLM2's 576 and Gemma-3's 640: 64-weight blocks for 2 bits, 3 bits rounds up to q4_0, 6 to q8_0
    for row in (576, 640):
        assert [gguf_plan.ggml_type(b, row) for b in (2, 3, 4, 5, 6, 8)] == ["q2_0", "q4_0", "q4_0", "q5_0", "q8_0", "q8_0"]
    assert gguf_plan.ggml_type(2, 96) == "q4_0"  # 32- but not 64-multiple
    assert gguf_plan.ggml_type(4, 100) == "f16"  # no block type fits
    choice = gguf_plan.plan(BitConfig({"model.layers.0.self_attn.q_proj": 3}, 64), {"blk.0.attn_q.weight": 576})[0]
    assert choice.substituted and choice.preferred == "q3_K" and choice.ggml_type == "q4_0"
    with pytest.raises(InvalidArgument, match="7-bit"):
        gguf_plan.ggml_type(7, 512)
    with pytest.raises(ValueError, match="no llama.cpp tensor name"):
        llamacpp.tensor_types(BitConfig({"lm_head": 4}, 64))
    with pytest.raises(InvalidArgument, match="model_type"):
        gguf_plan.architecture("phi3")


def test_type_file_names_each_tensor_exactly():
    types = {"blk.1.attn_q.weight": "q4_0", "blk.11.ffn_down.weight": "q3_K"}
    lines = [ln for ln in llamacpp.tensor_type_file(types).splitlines() if not ln.startswith("#")]
    assert lines == ["blk\\.1\\.attn_q\\.weight=q4_0", "blk\\.11\\.ffn_down\\.weight=q3_K"]
    assert not re.search(lines[0].split("=")[0], "blk.11.attn_q.weight")


# ------------------------------------------------------------------------------------ bad input
def _model_dir(tmp_path: Path, config, bits: dict[str, int] | None = None) -> Path:
    """An amq-like model directory: the model's config.json and a bit configuration."""
    d = tmp_path / "models" / "4.5"
    d.mkdir(parents=True)
    config.save_pretrained(d)
    names = discover_layout(_tiny(config)).names
    bits = bits or {n: 4 for n in names}
    (d / BITCONFIG_FILE).write_text(json.dumps(BitConfig(bits, 64).to_dict()))
    return d


SCRIPT, EXPORT = "llama_cpp.py", "amq-export --format gguf"


@pytest.fixture(params=[SCRIPT, EXPORT])
def command(request) -> str:
    """Both commands that take amq's plans to llama.cpp refuse the same inputs the same way."""
    return request.param


def _run(args: list[str], monkeypatch, capfd, command: str = SCRIPT) -> subprocess.CompletedProcess:
    """The command's main in this process: the exit status and stderr a new process gives, without
    its seconds of imports."""
    if command == SCRIPT:
        return main_in_process(SCRIPT, load_script("llama_cpp.py", monkeypatch).main, args, capfd)
    from amq.cli import export

    return main_in_process(EXPORT, lambda argv: export.main([*argv, "--format", "gguf"]), args, capfd)


def _refused(args: list[str], tmp_path: Path, monkeypatch, capfd, *needles: str, command: str = SCRIPT) -> None:
    before = sorted(p for p in tmp_path.rglob("*"))
    proc = _run(args, monkeypatch, capfd, command)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and "[ERROR]" in lines[0], proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written


def test_refuses_a_missing_directory(command, tmp_path, monkeypatch, capfd):
    _refused([str(tmp_path / "nowhere")], tmp_path, monkeypatch, capfd, "path:", "is not a directory", "valid:", command=command)


def test_refuses_a_directory_without_a_bit_configuration(command, tmp_path, monkeypatch, capfd):
    _refused([str(tmp_path)], tmp_path, monkeypatch, capfd, "path:", "bit_config.json", command=command)


def test_refuses_an_architecture_llama_cpp_names_otherwise(command, tmp_path, monkeypatch, capfd):
    opt = OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64)
    d = _model_dir(tmp_path, opt)
    _refused([str(d)], tmp_path, monkeypatch, capfd, "model:", "'opt'", "llama", "gemma3", command=command)


def test_refuses_a_width_without_a_ggml_type(command, tmp_path, monkeypatch, capfd):
    names = discover_layout(_tiny(CONFIGS["llama"])).names
    d = _model_dir(tmp_path, CONFIGS["llama"], {n: 7 if i == 0 else 4 for i, n in enumerate(names)})
    _refused([str(tmp_path)], tmp_path, monkeypatch, capfd, "bits", "7-bit has no llama.cpp type", "2, 3, 4, 5, 6, 8", command=command)
    assert d.is_dir()


def test_export_refuses_an_unknown_base_mix(tmp_path, monkeypatch, capfd):
    d = _model_dir(tmp_path, CONFIGS["llama"])
    _refused([str(d), "--base-mix", "Q9_K"], tmp_path, monkeypatch, capfd, "--base-mix", "Q9_K", "Q4_K_M", command=EXPORT)


def test_refuses_a_negative_chunk_count(command, tmp_path, monkeypatch, capfd):
    d = _model_dir(tmp_path, CONFIGS["llama"])
    _refused([str(d), "--chunks", "-1"], tmp_path, monkeypatch, capfd, "--chunks", "-1", "a positive integer", command=command)


def test_the_gguf_card_says_how_to_run_it_and_what_llama_cpp_measured():
    from amq.llamacpp.gguf_eval import render_card

    measured = {"perplexity": 24.5281, "perplexity_err": 1.2, "unquantized_perplexity": 22.9, "kld": 0.0842, "kld_err": 0.002}
    record = {
        "gguf": "m-amq-4.5.gguf", "target": "4.5", "model": "m", "file_mib": 89.3, "planned_tensors": 210, "bpw_linears": 4.61,
        "base_mix": "Q4_K_M", "llama_cpp": "1.0",
        "heldout": {"wiki": {**measured, "same_top_pct": 88.25, "tokens_read": 4096}, "lee": {**measured, "same_top_pct": None, "tokens_read": None}},
        "protocol": {"tool": "llama-perplexity --kl-divergence", "ctx": 512, "chunks": 8, "scored": "the second half of each chunk"},
    }  # fmt: skip
    card = render_card(record)
    assert "Speed" not in card  # not measured: no line
    speed = {"decode_tps": 250.84, "decode_sd": 2.6, "prefill_tps": 954.2, "prefill_sd": 9.1, "cpu": "X", "unquantized_decode_tps": 65.4}
    timed = render_card({**record, "speed": {**speed, "decode_vs_unquantized": 3.836}, "protocol": {**record["protocol"], "speed": "llama-bench on X"}})
    assert "Speed (llama-bench on X): decode 250.8 ± 2.6 tokens/s (3.84x the unquantized GGUF's 65.4), prefill 954 ± 9 tokens/s." in timed
    assert "llama-cli -m m-amq-4.5.gguf" in card and "`Q4_K_M`" in card and "4.61 bits a weight" in card
    assert "| wiki | 24.528 ± 1.200 | 22.900 | 0.0842 | 88.2% | 2048 |" in card
    assert "| lee | 24.528 ± 1.200 | 22.900 | 0.0842 | - | - |" in card  # not measured: a dash


def test_export_refuses_speed_without_the_evaluation(tmp_path, monkeypatch, capfd):
    d = _model_dir(tmp_path, CONFIGS["llama"])
    _refused([str(d), "--speed", "--no-eval"], tmp_path, monkeypatch, capfd, "--speed", "--no-eval", command=EXPORT)


KLD_LOG = """0.00.244.264 I kl_divergence: computing over 8 chunks, n_ctx=512, batch_size=2048, n_seq=4
Mean PPL(Q)                   :  20.471385 ±   1.339727
Mean PPL(Q)/PPL(base)         :   1.067750 ±   0.010842
Mean    KLD:   0.082422 ±   0.003414
99.0%   KLD:   0.647209
Same top p: 84.657 ± 0.798 %
"""
SHORT_LOG = """0.00.669.342 E perplexity: you need at least 1024 tokens to evaluate perplexity with a context of 512
0.00.669.342 E perplexity: the data file you provided tokenizes to only 514 tokens
"""


def test_llama_perplexity_logs_give_their_numbers_or_name_a_text_too_short_for_the_context():
    """llama-perplexity's KLD block parsed; a text shorter than two chunks (it says so and exits 0)
    is one error naming --ctx and a context that fits, never a measurement of nothing."""
    from amq.errors import ConfigError
    from amq.llamacpp.run import parse_perplexity_log

    r = parse_perplexity_log(KLD_LOG)
    assert (r.ppl, r.ppl_err, r.kld, r.kld_err, r.kld_99, r.same_top, r.tokens) == (20.471385, 1.339727, 0.082422, 0.003414, 0.647209, 84.657, 4096)
    with pytest.raises(ConfigError) as exc:
        parse_perplexity_log(SHORT_LOG, "heldout-lee.txt")
    assert str(exc.value) == (
        "--ctx: 512 tokens a chunk, but heldout-lee.txt holds 514 tokens; llama-perplexity needs at least 1024 (two chunks) (valid: --ctx 257 or less)"
    )


def test_refuses_an_unknown_mix(tmp_path, monkeypatch, capfd):
    d = _model_dir(tmp_path, CONFIGS["qwen2"])
    _refused([str(d), "--mixes", "Q4_K_M,Q9_K"], tmp_path, monkeypatch, capfd, "--mixes", "Q9_K", "Q4_K_S")


def test_export_refuses_one_out_folder_for_several_models(tmp_path, monkeypatch, capfd):
    d = _model_dir(tmp_path, CONFIGS["llama"])
    shutil.copytree(d, d.with_name("4"))
    _refused([str(tmp_path), "--out", str(tmp_path / "out")], tmp_path, monkeypatch, capfd, "--out", "2 models", command=EXPORT)


def test_refuses_a_missing_build_with_no_build(command, tmp_path, monkeypatch, capfd):
    d = _model_dir(tmp_path, CONFIGS["gemma3"])
    cache = tmp_path / "cache"
    cache.mkdir()
    _refused(
        [str(d), "--no-build", "--cache-dir", str(cache)], tmp_path, monkeypatch, capfd, "--no-build", "is not built", "without --no-build", command=command
    )


@pytest.mark.parametrize("option,value", [("--llama-cpp-version", "../elsewhere"), ("--llama-cpp-version", "latest"), ("--jobs", "0")])
def test_refuses_a_bad_build_setting_before_building(command, option, value, tmp_path, monkeypatch, capfd):
    """The version names the build's folder under the cache: a path or a word is one line, and no
    folder appears anywhere; so is a job count below one."""
    d = _model_dir(tmp_path, CONFIGS["llama"])
    cache = tmp_path / "cache"
    _refused([str(d), "--cache-dir", str(cache), option, value], tmp_path, monkeypatch, capfd, option, value, "valid:", command=command)
    assert not cache.exists() and not (tmp_path / "elsewhere").exists()


def test_refuses_a_failing_build(tmp_path, monkeypatch, capfd):
    """A version PyPI does not have: pip download fails, the build stops with one line, no tools appear."""
    d = _model_dir(tmp_path, CONFIGS["llama"])
    cache = tmp_path / "cache"
    proc = _run([str(d), "--cache-dir", str(cache), "--llama-cpp-version", "0.0.0.dev424242"], monkeypatch, capfd)
    lines = [ln for ln in proc.stderr.splitlines() if "[ERROR]" in ln]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "llama.cpp build: pip download failed" in lines[0]
    root = locate(cache, "0.0.0.dev424242")
    assert not root.ready() and not root.bin_dir.exists() and not root.source.exists()


def test_a_tool_killed_by_a_signal_is_one_line_naming_a_log_that_exists(tmp_path):
    """A tool that dies (here of SIGILL, as a build with instructions the CPU lacks does) names the
    signal and a log that is still there; the temporary log it wrote is moved, not left behind."""
    from amq.errors import ConfigError
    from amq.llamacpp.run import _run

    tmp_log, kept = tmp_path / ".x.kld.log.1.tmp", tmp_path / "x.kld.failed.log"
    die = [sys.executable, "-c", "import os, signal; print('started'); os.kill(os.getpid(), signal.SIGILL)"]
    with pytest.raises(ConfigError) as info:
        _run(die, tmp_log, "llama-perplexity", failed_log=kept)
    assert "killed by SIGILL" in str(info.value) and str(kept) in str(info.value)
    assert kept.is_file() and "started" in kept.read_text() and not tmp_log.exists()


def test_the_build_leaves_out_amx_on_x86():
    """ggml's AMX kernels died of SIGILL on an AMX Xeon guest (amq/llamacpp/build.py): left out, and
    the binaries' directory says so, so a build made before with them is not reused."""
    import platform

    from amq.llamacpp import build

    options = build._cmake_options()
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert any(o.startswith("-DCMAKE_CXX_FLAGS=") and "-mno-amx-int8" in o for o in options)
    assert locate(Path("/nonexistent"), DEFAULT_VERSION).bin_dir.name.endswith(build.BUILD_FLAVOUR)


# ----------------------------------------------------------------------------- with the tools
def _caches() -> list[Path]:
    return [Path(c) for c in (os.environ.get("AMQ_CACHE_DIR"), Path.home() / ".cache" / "amq") if c]


def _built():
    return next((lc for c in _caches() if (lc := locate(c, DEFAULT_VERSION)).ready()), None)


def _smollm2_tokenizer_dir() -> Path | None:
    """SmolLM2's tokenizer from amq's converted copy (llama.cpp's converter knows its pre-tokenizer)."""
    return next((d for c in _caches() for d in sorted((c / "models").glob("smollm2-*")) if (d / "tokenizer.json").is_file()), None)


def _tools_and_tokenizer() -> tuple:
    """The built tools and SmolLM2's converted tokenizer, or the test skipped."""
    lc, tok = _built(), _smollm2_tokenizer_dir()
    if lc is None or tok is None:
        pytest.skip("llama.cpp is not built (python scripts/llama_cpp.py builds it) or SmolLM2 is not converted yet")
    return lc, tok


def _checkpoint(model: torch.nn.Module, tok: Path, dest: Path) -> Path:
    """`model` saved with SmolLM2's tokenizer beside it: a directory llama.cpp's converter takes."""
    model.save_pretrained(dest)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok / name, dest / name)
    return dest


# llama.cpp's own HF -> GGUF name map (the converter's gguf-py, from the cached source), per family
_NAME_MAP = """
import json, sys
sys.path.insert(0, sys.argv[1])
import gguf
arch, n_blocks, names = sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
m = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_blocks)
print(json.dumps({n: m.get_name(n + ".weight", try_suffixes=(".weight",)) for n in names}))
"""
FAMILIES = {
    "llama": LlamaConfig(**SHAPES),
    "mistral": MistralConfig(**SHAPES),
    "qwen2": Qwen2Config(**SHAPES),
    "qwen3": Qwen3Config(**SHAPES),
    "gemma2": Gemma2Config(**{**SHAPES, "head_dim": 64}),
    "gemma3_text": CONFIGS["gemma3"],
}


@pytest.mark.heavy
@pytest.mark.parametrize("family", list(FAMILIES))
def test_llama_cpp_names_every_family_as_the_plan_does(family):
    """llama.cpp's converter maps each family's linears to the GGUF names the plan uses."""
    src = next((lc.source for c in _caches() if (lc := locate(c, DEFAULT_VERSION)).convert_script.is_file()), None)
    if src is None:
        pytest.skip("llama.cpp's source is not cached (python scripts/llama_cpp.py fetches it)")
    model = _tiny(FAMILIES[family])
    names = discover_layout(model).names
    arch = gguf_plan.architecture(model.config.model_type)
    proc = subprocess.run([sys.executable, "-c", _NAME_MAP, str(src / "gguf-py"), arch, "2", json.dumps(names)], capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout) == {n: gguf_plan.gguf_tensor_names(n)[0] for n in names}


@pytest.mark.heavy
@pytest.mark.parametrize("family", ["llama", "gemma3"])  # qwen2's converter wants a Qwen tokenizer (not offline); its names: above
def test_llama_cpp_names_and_writes_the_planned_types(family, tmp_path):
    """llama.cpp's converter names the tiny model's linears as the plan does, and llama-quantize
    writes exactly the planned types (no fallback) from the plan's type file."""
    pytest.importorskip("sentencepiece")
    lc, tok = _tools_and_tokenizer()
    from amq.llamacpp import run
    from amq.llamacpp.pipeline import gguf_shapes

    config = CONFIGS[family].__class__(**{**CONFIGS[family].to_dict(), "vocab_size": 49152})  # the tokenizer's vocabulary
    model = _tiny(config).to(torch.float32)
    src = _checkpoint(model, tok, tmp_path / "hf")
    base = run.convert(lc, src, tmp_path / "base.gguf", "f32")
    rows, _ = gguf_shapes(base)
    layout = discover_layout(model)
    choices = gguf_plan.plan(_mixed(layout.names, (2, 3, 4, 5, 6, 8)), rows)
    assert {c.row_length for c in choices} == {li.in_features for li in layout.linears}
    q = run.quantize(lc, base, tmp_path / "amq.gguf", "Q8_0", None, run.ToolOptions(threads=2), {c.tensor: c.ggml_type for c in choices})
    assert {c.tensor: q.types[c.tensor] for c in choices} == {c.tensor: c.ggml_type for c in choices}
    assert not q.fallbacks
    assert q.file_bytes == (tmp_path / "amq.gguf").stat().st_size > 0


@pytest.mark.heavy
def test_export_writes_a_gguf_of_the_planned_types(tmp_path):
    """`amq-export --format gguf` on a tiny Llama (SmolLM2's tokenizer): llama.cpp's converter, an
    imatrix on the embedded calibration text, then llama-quantize with the plan; the file lands in
    `<model dir>/gguf/` with every planned tensor in its planned type, and a second export replaces it."""
    pytest.importorskip("sentencepiece")
    lc, tok = _tools_and_tokenizer()
    from gguf import GGUFReader

    from amq.cli import export

    config = LlamaConfig(**{**SHAPES, "vocab_size": 49152})
    src = _checkpoint(_tiny(config).to(torch.float32), tok, tmp_path / "hf")
    names = discover_layout(_tiny(config)).names
    d = _model_dir(tmp_path, config, {n: (3, 4, 8)[i % 3] for i, n in enumerate(names)})
    args = [str(d), "--format", "gguf", "--model", str(src), "--imatrix-chunks", "2", "--ctx", "128", "--chunks", "2", "--cache-dir", str(lc.root.parents[1])]
    assert export.main([*args, "--speed"]) == 0
    (gguf,) = (d / "gguf").glob("*.gguf")
    written = {t.name: t.tensor_type.name.lower() for t in GGUFReader(gguf).tensors}
    planned = gguf_plan.tensor_types(read_bit_config(d), {t.name: int(t.shape[0]) for t in GGUFReader(gguf).tensors})
    assert {t: written[t] for t in planned} == {t: ty.lower() for t, ty in planned.items()}  # GGUFReader's names: q3_k for q3_K
    # measured by llama-perplexity on every held-out text of the embedded data, against the unquantized GGUF
    record = json.loads((d / "gguf" / "eval.json").read_text())
    assert record["gguf"] == gguf.name and set(record["heldout"]) == {"wiki", "lee"}
    for v in record["heldout"].values():
        assert v["perplexity"] > 1 and v["unquantized_perplexity"] > 1 and v["kld"] > -1e-3 and v["tokens_read"] == 2 * 128
    assert record["speed"]["decode_tps"] > 0 and record["speed"]["decode_vs_unquantized"] > 0  # one llama-bench run with the f32 GGUF
    assert f"llama-cli -m {gguf.name}" in (d / "gguf" / "README.md").read_text()
    first = gguf.stat().st_mtime_ns
    assert export.main([*args, "--base-mix", "Q8_0", "--no-eval"]) == 0 and gguf.stat().st_mtime_ns != first
    assert not (d / "gguf" / "eval.json").exists() and not (d / "gguf" / "README.md").exists()  # they described the replaced file


# ------------------------------------------------------------------------------- mixture of experts
def _moe(arch: str) -> torch.nn.Module:
    from amq.modeling.experts import unfuse_experts
    from amq.modeling.random_init import build_model

    model = build_model(arch, "cpu", torch.float32, seed=0)
    unfuse_experts(model)  # amq's experts: one nn.Linear per expert and projection, as the search sees them
    return model


@pytest.mark.parametrize("arch", ["tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe"])
def test_experts_of_one_projection_are_one_gguf_tensor_at_their_one_width(arch):
    """llama.cpp keeps a block's experts in one tensor per projection (ffn_gate_exps, ffn_up_exps,
    ffn_down_exps): a plan with one width per projection (search.expert_genes=projection) maps onto
    it, gate_up to two tensors; experts of one projection at two widths are refused, naming the way out."""
    model = _moe(arch)
    layout = discover_layout(model)
    assert gguf_plan.architecture(model.config.model_type) in ("llama", "qwen2moe", "qwen3moe")
    per_projection = {n: (4 if n.endswith("down_proj") else 3) if ".experts." in n else 8 for n in layout.names}
    choices = gguf_plan.plan(BitConfig(per_projection, 64), gguf_plan.row_lengths(layout.linears))
    by_tensor = {c.tensor: c for c in choices}
    n_experts = model.config.num_experts if hasattr(model.config, "num_experts") else model.config.num_local_experts
    for block in range(model.config.num_hidden_layers):
        for role, bits, rows in (("gate", 3, model.config.hidden_size), ("up", 3, model.config.hidden_size), ("down", 4, None)):
            c = by_tensor[f"blk.{block}.ffn_{role}_exps.weight"]
            assert c.bits == bits and len(c.modules) == n_experts and all(".experts." in m for m in c.modules)
            assert rows is None or c.row_length == rows
    assert len(choices) == len(layout.names) - (2 * n_experts - 3) * model.config.num_hidden_layers  # 2E expert linears -> 3 tensors a block
    if arch == "tiny-qwen2-moe":
        assert by_tensor["blk.0.ffn_down_shexp.weight"].modules == ("model.layers.0.mlp.shared_expert.down_proj",)
    mixed = dict(per_projection)
    mixed[next(n for n in layout.names if n.endswith("experts.1.down_proj"))] = 8
    with pytest.raises(InvalidArgument, match=r"ffn_down_exps.weight holds \d+ experts at 4/8 bits.*search.expert_genes=projection"):
        gguf_plan.plan(BitConfig(mixed, 64))


@pytest.mark.heavy
@pytest.mark.parametrize("arch", ["tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe"])
def test_export_writes_a_mixture_of_experts_gguf_with_one_type_per_projection(arch, tmp_path):
    """A tiny mixture-of-experts model through `amq-export --format gguf`: llama.cpp's converter
    stacks each block's experts into ffn_gate_exps/ffn_up_exps/ffn_down_exps, and llama-quantize
    writes the plan's width of each projection there."""
    pytest.importorskip("sentencepiece")
    lc, tok = _tools_and_tokenizer()
    from amq.cli import export
    from amq.llamacpp import run
    from amq.modeling.random_init import build_model

    src = _checkpoint(build_model(arch, "cpu", torch.float32, seed=0, overrides={"vocab_size": 49152}), tok, tmp_path / "hf")
    names = discover_layout(_moe(arch)).names
    bits = {n: (5 if n.endswith("down_proj") else 2) if ".experts." in n else 8 for n in names}  # each its own type at 64-wide rows
    d = tmp_path / "models" / "4"
    d.mkdir(parents=True)
    shutil.copy(src / "config.json", d / "config.json")
    (d / BITCONFIG_FILE).write_text(json.dumps(BitConfig(bits, 64).to_dict()))
    args = [str(d), "--format", "gguf", "--model", str(src), "--imatrix-chunks", "2", "--ctx", "128", "--cache-dir", str(lc.root.parents[1])]
    assert export.main(args) == 0
    (gguf,) = (d / "gguf").glob("*.gguf")
    written = run.parse_quantize_log(gguf.with_suffix(".quantize.log").read_text(), gguf).types  # the pip gguf reader predates q2_0
    for block in (0, 1):
        assert written[f"blk.{block}.ffn_gate_exps.weight"] == written[f"blk.{block}.ffn_up_exps.weight"] == "q2_0"
        assert written[f"blk.{block}.ffn_down_exps.weight"] == "q5_0" and written[f"blk.{block}.attn_q.weight"] == "q8_0"
        if arch == "tiny-qwen2-moe":  # the shared expert: a linear of its own, here at 8 bits
            assert written[f"blk.{block}.ffn_down_shexp.weight"] == "q8_0"


def test_a_hub_model_converts_from_its_snapshot_in_the_hugging_face_cache(tmp_path):
    """A model the search loaded by hub id is converted from the cache's snapshot of the commit it
    was loaded at (as a search with network leaves it); not cached, or a local path that is not a
    model, gives None, which the commands turn into one line naming `model`."""
    from amq.llamacpp.inputs import checkpoint_dir

    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "models--acme--tiny-llama" / "snapshots" / commit
    model = _tiny(CONFIGS["llama"])
    model.save_pretrained(snapshot)
    model.name_or_path, model.config._commit_hash = "acme/tiny-llama", commit
    assert checkpoint_dir(model, tmp_path / "hub") == snapshot
    model.config._commit_hash = "f" * 40  # another commit: not in the cache
    assert checkpoint_dir(model, tmp_path / "hub") is None
    model.name_or_path = str(tmp_path / "nowhere")
    assert checkpoint_dir(model, tmp_path / "hub") is None
    model.name_or_path = str(snapshot)  # a local directory is itself
    assert checkpoint_dir(model) == snapshot


# ------------------------------------------------------------------------------------ speed (--speed)
def _bench_record(model: str, n_prompt: int, n_gen: int, ts: float) -> dict:
    return {"model_filename": model, "cpu_info": "Some CPU", "n_prompt": n_prompt, "n_gen": n_gen, "avg_ts": ts, "stddev_ts": ts / 100}


def test_llama_bench_json_gives_each_models_decode_and_prefill_and_the_table_shows_them(tmp_path):
    from amq.llamacpp import report, run

    records = [_bench_record("a.gguf", 512, 0, 950.0), _bench_record("a.gguf", 0, 128, 250.0), _bench_record("b.gguf", 512, 0, 660.0)]
    speeds = run.parse_bench_json(json.dumps(records + [_bench_record("b.gguf", 0, 128, 200.0)]))
    assert speeds["a.gguf"] == run.Speed(250.0, 2.5, 950.0, 9.5, "Some CPU") and speeds["b.gguf"].decode == 200.0
    assert "b.gguf" not in run.parse_bench_json(json.dumps(records))  # a model without both tests is left out, not half-filled
    base = dict(
        kind="uniform", ftype="Q4_K_M", file_mib=90.0, bpw=5.5, bpw_linears=4.6, ppl=24.5, ppl_err=1.0, kld=0.08, kld_err=0.01, same_top=84.0, kld_99=0.5
    )
    rows = [report.Row(label="Q4_K_M", **base, speed=dataclasses.asdict(speeds["a.gguf"])), report.Row(label="Q8_0", **base)]
    protocol = {
        "model": "m",
        "heldout": "wiki",
        "ppl_tokens": "t",
        "chunks": 4,
        "ctx": 512,
        "outtype": "f32",
        "imatrix": "i",
        "speed": "llama-bench ... on Some CPU",
    }
    text = report.render_markdown(rows, protocol)
    assert "decode t/s | prefill t/s |" in text and "| 250.0 ± 2.5 | 950 ± 10 |" in text and "| - | - |" in text and "Tokens/s: llama-bench" in text
    assert "decode t/s" not in report.render_markdown([report.Row(label="Q8_0", **base)], {**protocol, "speed": None})


def test_an_optional_tool_needs_a_ready_build_and_a_known_name(tmp_path):
    from amq.errors import ConfigError
    from amq.llamacpp.build import ensure_tool

    lc = locate(tmp_path, DEFAULT_VERSION)
    with pytest.raises(ConfigError, match="llama-cli"):
        ensure_tool(lc, "llama-cli")
    with pytest.raises(ConfigError, match="is not built"):
        ensure_tool(lc, "llama-bench")


@pytest.mark.heavy
def test_llama_bench_times_every_gguf_in_one_run(tmp_path):
    """The built llama-bench (made on first use) times two GGUFs of a tiny Llama side by side."""
    lc, tok = _tools_and_tokenizer()
    from amq.llamacpp import run
    from amq.llamacpp.build import ensure_tool

    config = LlamaConfig(**{**SHAPES, "vocab_size": 49152})
    src = _checkpoint(_tiny(config).to(torch.float32), tok, tmp_path / "hf")
    base = run.convert(lc, src, tmp_path / "base.gguf", "f32")
    q8 = tmp_path / "q8.gguf"
    run.quantize(lc, base, q8, "Q8_0", None, run.ToolOptions(threads=2))
    speeds = run.bench(
        ensure_tool(lc, "llama-bench"), [base, q8], run.ToolOptions(threads=2), tmp_path / "bench.log", decode_tokens=8, prompt_tokens=32, reps=1
    )
    assert set(speeds) == {str(base), str(q8)} and all(s.decode > 0 and s.prefill > 0 for s in speeds.values())
