"""The compressed-tensors export loads in plain transformers, in a process that never imports amq,
and gives the logits of `amq.load_quantized` (tiny random Llama, mixed widths, real quantizers)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

pytest.importorskip("compressed_tensors")

from amq.bits import BitConfig  # noqa: E402
from amq.errors import InvalidArgument  # noqa: E402
from amq.modeling.discovery import discover_layout  # noqa: E402
from amq.quantizers.awq import AWQFinalizer  # noqa: E402
from amq.quantizers.compressed_tensors import checkpoint, export_compressed_tensors  # noqa: E402
from amq.quantizers.export import load_quantized, write_model_dir  # noqa: E402
from amq.quantizers.folding import find_producers, fold_into_quantized_linears, folded_norm, norm_form, storable_scale  # noqa: E402
from amq.quantizers.grid import GridForm, grouped, minmax_grid, rtn_quant, to_codes  # noqa: E402
from amq.quantizers.hqq import HQQFinalizer  # noqa: E402
from amq.quantizers.packed import GroupQuant, PackedLinear, replace_linears  # noqa: E402

GROUP = 32
CONFIG = LlamaConfig(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True
)
CONFIG_MHA = LlamaConfig(**{**CONFIG.to_dict(), "num_key_value_heads": 4})  # v_proj as wide as o_proj's input: o_proj's scale folds too
CONFIG_GEMMA = Gemma3TextConfig(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16
)
TOKENS = torch.arange(3, 67).view(2, 32) % CONFIG.vocab_size
# Measured max |logit difference| to amq (logits up to ~1.3): 0 in float32 and bfloat16 alike
# (bit-identical weights: compressed-tensors dequantizes in the model's dtype, amq in float32, and
# amq's scales and zero points are held exactly in the model's dtype, `grid.held_scale`; before,
# bfloat16 gave 0.0078, one bf16 step). Input scales folded into norms and producer linears round
# once more (float16 group scales / s): float32 1.5e-4 with scales in [0.25, 3.25], bfloat16 0.026.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-5}
FOLDED_TOLERANCE = {torch.float32: 5e-4, torch.bfloat16: 3e-2}

# Runs in a fresh interpreter: transformers alone rebuilds each exported model.
LOADER = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out = {}
for d in json.loads(sys.argv[1]):
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    AutoTokenizer.from_pretrained(d)
    with torch.no_grad():
        torch.save(model(input_ids=torch.load(sys.argv[2])).logits.float(), d + "/logits.pt")
    out[d] = str(model.dtype)
assert not any(m == "amq" or m.startswith("amq.") for m in sys.modules), "the loader imported amq"
print(json.dumps(out))
"""


def _tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, CONFIG.vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _integer_zero_quant(w: torch.Tensor, bits: int, group_size: int) -> GroupQuant:
    """amq's min-max grid with its zero point rounded to an integer (the GPTQ reference's grid)."""
    g = grouped(w.float(), group_size)
    scale, zero = minmax_grid(g, bits, form=GridForm(w.dtype))
    zero = zero.round()
    return GroupQuant(to_codes(g, scale, zero, bits).reshape(w.shape).to(torch.uint8), scale.half(), zero.half(), bits, group_size)


def _quants(model: LlamaForCausalLM, kind: str) -> dict[str, GroupQuant]:
    """Every decoder linear quantized, the widths cycling through 2, 3, 4 and 8 bits."""
    layout = discover_layout(model)
    bits = {li.name: (2, 3, 4, 8)[i % 4] for i, li in enumerate(layout.linears)}
    if kind == "hqq":
        return HQQFinalizer().quantize(model, layout, bits, GROUP)
    if kind.startswith("awq"):  # real AWQ on random calibration windows; fold=false for "awq-free"
        calib = torch.randint(3, CONFIG.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
        return AWQFinalizer(n_grid=5, fold=kind != "awq-free").quantize(model, layout, bits, GROUP, calib)
    if kind.startswith("scaled"):  # AWQ-like input scales far from 1, one per input every layer reads
        quants = {n: rtn_quant(model.get_submodule(n).weight.detach(), b, GROUP) for n, b in bits.items()}
        g = torch.Generator().manual_seed(1)
        for block in range(CONFIG.num_hidden_layers):
            for stage in (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)):
                names = [n for n in quants if n.startswith(f"model.layers.{block}.") and n.rpartition(".")[2] in stage]
                s = (0.25 + 3 * torch.rand(quants[names[0]].shape[1], generator=g)).half()
                for n in names:
                    quants[n].input_scale = s
        return quants
    quant = rtn_quant if kind == "rtn" else _integer_zero_quant
    return {n: quant(model.get_submodule(n).weight.detach(), b, GROUP) for n, b in bits.items()}


CASES = [  # (name, quantizer, dtype, zero_points)
    ("int-zero-bf16", "int-zero", torch.bfloat16, "exact"),
    ("int-zero-f32", "int-zero", torch.float32, "exact"),
    ("rtn-bf16", "rtn", torch.bfloat16, "exact"),
    ("hqq-bf16", "hqq", torch.bfloat16, "exact"),
    ("hqq-f32", "hqq", torch.float32, "exact"),
    ("hqq-round-bf16", "hqq", torch.bfloat16, "round"),
    ("awq-bf16", "awq", torch.bfloat16, "exact"),
    ("scaled-mha-f32", "scaled-mha", torch.float32, "exact"),
    ("awq-gemma-bf16", "awq-gemma", torch.bfloat16, "exact"),
]


def _model(kind: str, dtype: torch.dtype) -> torch.nn.Module:
    """The case's tiny model. Gemma's offset norms (x * (1 + w)) get factors like Gemma-3-270M's: most
    in (0, 0.3], a few as large as 1000. Folding an AWQ scale s leaves them (1 + w) / s, stored as a bfloat16
    w next to -1 (steps of 2^-8), and the large factors once hid a wrong guess of the norm's form."""
    if not kind.endswith("-gemma"):
        return LlamaForCausalLM(CONFIG_MHA if kind.endswith("-mha") else CONFIG).to(dtype).eval().requires_grad_(False)
    model = Gemma3ForCausalLM(CONFIG_GEMMA).to(dtype).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(3)
    for name, module in model.named_modules():
        if name.endswith(("input_layernorm", "pre_feedforward_layernorm")):
            factor = 0.01 + 0.29 * torch.rand(module.weight.numel(), generator=g)
            factor[:2] = 1000.0
            module.weight.copy_(factor - 1)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory, plain_python) -> dict[str, dict]:
    """Each case exported by amq, reloaded with `load_quantized`, converted; then all loaded by transformers."""
    root = tmp_path_factory.mktemp("ct")
    torch.save(TOKENS, root / "tokens.pt")
    cases = {}
    for name, kind, dtype, zero_points in CASES:
        torch.manual_seed(0)
        model = _model(kind, dtype)
        quants = _quants(model, kind)
        replace_linears(model, quants, dtype)
        amq_dir = write_model_dir(root / f"{name}-amq", model, _tokenizer(), BitConfig({n: q.bits for n, q in quants.items()}, GROUP), {"name": kind})
        reloaded = load_quantized(amq_dir)
        ct_dir = export_compressed_tensors(amq_dir, root / name, zero_points)
        if zero_points == "round":  # the reference is amq's model with its zero points rounded
            reloaded = copy.deepcopy(reloaded)
            for m in reloaded.modules():
                if isinstance(m, PackedLinear):
                    m.zero.copy_(m.zero.float().round())
                    m._dequantized = None
        with torch.no_grad():
            ref = reloaded(input_ids=TOKENS).logits.float()
        cases[name] = {"dir": ct_dir, "ref": ref, "dtype": dtype, "kind": kind, "zero_points": zero_points}
    dirs = [str(c["dir"]) for c in cases.values()]
    proc = plain_python.run(LOADER, [json.dumps(dirs), str(root / "tokens.pt")], timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    dtypes = json.loads(proc.stdout.strip().splitlines()[-1])
    for c in cases.values():
        c["loaded_dtype"] = dtypes[str(c["dir"])]
        c["logits"] = torch.load(c["dir"] / "logits.pt")
    return cases


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_transformers_alone_gives_amq_logits(exported, name):
    case = exported[name]
    assert case["loaded_dtype"] == str(case["dtype"])
    diff = float((case["logits"] - case["ref"]).abs().max())
    tolerance = (FOLDED_TOLERANCE if case["kind"].startswith(("awq", "scaled")) else TOLERANCE)[case["dtype"]]
    assert diff <= tolerance, f"{name}: max |logit diff| {diff:.3g} vs {float(case['ref'].abs().max()):.3g}"


def test_formats_follow_the_zero_points(exported):
    """Integer zeros are bit-packed; amq's float zeros stay exact in naive-quantized unless rounded.
    In a bfloat16 model 8-bit zero points are whole steps (`grid.held_zero`), so
    those layers pack."""
    for name, case in exported.items():
        config = json.loads((case["dir"] / "config.json").read_text())["quantization_config"]
        groups = config["config_groups"]
        formats = {g["weights"]["num_bits"]: g["format"] for g in groups.values()}
        packed = case["kind"] == "int-zero" or case["zero_points"] == "round"
        for bits, fmt in formats.items():
            whole = bits == 8 and case["dtype"] == torch.bfloat16
            assert fmt == ("pack-quantized" if packed or whole else "naive-quantized"), (name, bits, fmt)
        assert config["format"] == (formats.popitem()[1] if len(set(formats.values())) == 1 else "mixed-precision")
        assert config["quant_method"] == "compressed-tensors"
        assert sorted(g["weights"]["num_bits"] for g in groups.values()) == [2, 3, 4, 8]
        assert sum(len(g["targets"]) for g in groups.values()) == 14
        for file in ("tokenizer.json", "tokenizer_config.json", "model.safetensors"):
            assert (case["dir"] / file).is_file(), (name, file)


def test_packed_layers_take_their_width_on_disk(exported):
    """b-bit codes in int32 words: 32 // b codes a word (compressed-tensors 0.17; from 0.18 on, 32 / b)."""
    from safetensors import safe_open

    with safe_open(str(exported["int-zero-bf16"]["dir"] / "model.safetensors"), "pt") as f:
        for bits, layer in (
            (2, "model.layers.0.self_attn.q_proj"),
            (3, "model.layers.0.self_attn.k_proj"),
            (4, "model.layers.0.self_attn.v_proj"),
            (8, "model.layers.0.self_attn.o_proj"),
        ):
            packed = f.get_tensor(f"{layer}.weight_packed")
            out_f, in_f = f.get_tensor(f"{layer}.weight_shape").tolist()
            assert packed.dtype == torch.int32 and packed.shape[0] == out_f
            assert in_f * bits <= packed.shape[1] * 32 <= -(-in_f // (32 // bits)) * 32, (layer, tuple(packed.shape))


def test_awq_scales_move_into_their_producers(exported):
    """q/k/v and gate/up fold into their norms, down_proj into up_proj, o_proj into v_proj where
    attention is multi-head; under grouped-query attention o_proj keeps no scale at all."""
    from safetensors import safe_open

    for name in ("awq-bf16", "scaled-mha-f32"):
        with safe_open(str(exported[name]["dir"] / "model.safetensors"), "pt") as f:
            assert not any("input_scale" in k for k in f.keys())
    with safe_open(str(exported["scaled-mha-f32"]["dir"] / "model.safetensors"), "pt") as f:
        for norm in ("input_layernorm", "post_attention_layernorm"):
            w = f.get_tensor(f"model.layers.0.{norm}.weight")
            assert not torch.allclose(w, torch.ones_like(w)), f"{norm} took no scale"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scales_move_into_the_quantized_linears_before_them_and_the_model_computes_the_same(dtype):
    """AWQ folds down_proj's scale into up_proj's group scales (and o_proj's into v_proj's under
    multi-head attention) itself, held in the model's dtype; a producer with a bias is left to the export."""
    torch.manual_seed(0)
    model = _model("scaled-mha", dtype)
    for name, module in model.named_modules():  # one up_proj with a bias: its reader keeps its scale
        if name == "model.layers.1.mlp.up_proj":
            module.bias = torch.nn.Parameter(0.1 * torch.randn(module.out_features, generator=torch.Generator().manual_seed(0)).to(dtype), requires_grad=False)
    quants = _quants(model, "scaled-mha")
    producers = find_producers(model, [n for n, q in quants.items() if q.input_scale is not None])
    folded = copy.deepcopy(quants)
    moved = fold_into_quantized_linears(model, folded, producers)
    assert sorted(moved) == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"], moved
    assert folded["model.layers.1.mlp.down_proj"].input_scale is not None and folded["model.layers.0.mlp.down_proj"].input_scale is None
    up = folded["model.layers.0.mlp.up_proj"].scale.float()
    assert torch.equal(up, up.to(dtype).float()), "the folded group scales are held in the model's dtype"
    logits = {}
    for key, q in (("before", quants), ("after", folded)):
        m = copy.deepcopy(model)
        replace_linears(m, q, dtype)
        with torch.no_grad():
            logits[key] = m(input_ids=TOKENS).logits.float()
    scale = float(logits["before"].abs().max())
    assert float((logits["after"] - logits["before"]).abs().max()) <= (5e-4 if dtype == torch.float32 else 3e-2) * scale  # measured 7.9e-5, 6.1e-3


@pytest.mark.parametrize("kind", ["awq", "awq-free"])
def test_the_finalize_stage_evaluates_the_form_the_checkpoint_holds(kind):
    """`in_shipped_form`: AWQ's scales folded into the norms for the duration (and the norms given
    back after); scales that cannot fold (fold=false) are left in their layers, without an error."""
    from amq.finalize.stage import in_shipped_form, packed_swap

    torch.manual_seed(0)  # the model's initialisation: its AWQ scales must not depend on the tests before
    model = _model(kind, torch.float32)
    quants = _quants(model, kind)
    norms = {n: p for n, p in model.named_parameters() if "layernorm" in n}
    before = {n: p.detach().clone() for n, p in norms.items()}
    with packed_swap(model, quants), in_shipped_form(model):
        kept = [n for n, m in model.named_modules() if isinstance(m, PackedLinear) and m.input_scale is not None]
        with torch.no_grad():
            logits = model(input_ids=TOKENS).logits
        folded = any(not torch.equal(p, before[n]) for n, p in norms.items())
    if kind == "awq":
        assert not kept and folded
        expected = copy.deepcopy(model)
        replace_linears(expected, quants, torch.float32)
        with torch.no_grad():
            assert float((logits - expected(input_ids=TOKENS).logits).abs().max()) <= FOLDED_TOLERANCE[torch.float32]
    else:
        assert kept and not folded
    assert all(torch.equal(p, before[n]) for n, p in norms.items())


def test_awq_with_a_scale_per_linear_is_refused():
    """fold=false gives q/k/v different scales, which their one norm cannot absorb: refused, never dropped."""
    model = LlamaForCausalLM(CONFIG).eval().requires_grad_(False)
    replace_linears(model, _quants(model, "awq-free"), torch.float32)
    with pytest.raises(InvalidArgument, match="AWQ input scale"):
        checkpoint(model)


def _gemma_norm(dtype: torch.dtype) -> torch.nn.Module:
    """A Gemma offset norm (x * (1 + w)) with factors like Gemma-3-270M's: small ones and large outliers."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    norm = Gemma3RMSNorm(64).to(dtype).requires_grad_(False)
    factor = 0.01 + 0.29 * torch.rand(64, generator=torch.Generator().manual_seed(0))
    factor[:2] = 1000.0
    norm.weight.copy_(factor - 1)
    return norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_offset_norm_is_recognised_whatever_its_outliers(dtype):
    """Decided channel by channel in float32: the outliers once let the plain form `w / s` pass a check
    relative to the largest output, and the export folded the scale wrongly."""
    norm = _gemma_norm(dtype)
    m = 1 + norm.weight.float()
    s = storable_scale(norm, "offset", 0.1 + 8 * torch.rand(64, generator=torch.Generator().manual_seed(2)))
    for seed in range(10):  # the former check took the plain form for probes 5 and 8
        probe = torch.randn(4, 64, generator=torch.Generator().manual_seed(seed)).to(dtype)
        assert norm_form(norm, probe) == "offset", seed
        weights, form = folded_norm(norm, s, probe)
        assert form == "offset" and torch.allclose(1 + weights["weight"].float(), m / s, rtol=1e-5), seed


def test_awq_scales_of_an_offset_norm_are_ones_its_dtype_stores():
    """Folding s into a bfloat16 offset norm stores (1 + w) / s - 1 next to -1 (steps of 2^-8), so a
    raw scale loses small factors outright; `storable_scale` moves s to the nearest scale whose
    folded factor bfloat16 holds exactly, and AWQ searches among those."""
    norm = _gemma_norm(torch.bfloat16)
    m = 1 + norm.weight.float()
    raw = 0.1 + 8 * torch.rand(64, generator=torch.Generator().manual_seed(2))
    lossy = 1 + ((m / raw) - 1).to(torch.bfloat16).float()
    assert float(((lossy - m / raw).abs() / (m / raw)).max()) > 0.1  # what a raw scale would cost
    s = storable_scale(norm, "offset", raw)
    stored = 1 + ((m / s) - 1).to(torch.bfloat16).float()
    assert torch.allclose(stored, m / s, rtol=1e-5) and bool((stored > 0).all())
    assert float((s / raw).log().abs().median()) < 0.05  # most scales barely move
    assert torch.equal(storable_scale(norm, "offset", s), s)  # already storable: unchanged


def test_scales_a_bfloat16_offset_norm_cannot_store_are_refused():
    """A model quantized with raw AWQ scales (before they were made storable) would export factors
    off by far more than bfloat16 rounding: refused with the way out, never written wrong."""
    model = _model("awq-gemma", torch.bfloat16)
    quants = {n: rtn_quant(model.get_submodule(n).weight.detach(), 4, GROUP) for n in (li.name for li in discover_layout(model).linears)}
    for block in range(CONFIG_GEMMA.num_hidden_layers):
        for stage in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            names = [n for n in quants if n.startswith(f"model.layers.{block}.") and n.rpartition(".")[2] in stage]
            s = (0.1 + 8 * torch.rand(CONFIG_GEMMA.hidden_size, generator=torch.Generator().manual_seed(block))).half()
            for n in names:
                quants[n].input_scale = s
    replace_linears(model, quants, torch.bfloat16)
    with pytest.raises(InvalidArgument, match="cannot store the AWQ input scales.*finalize the run again with finalizer=awq"):
        checkpoint(model)
    for name, module in model.named_modules():  # the same scales made storable export
        if isinstance(module, PackedLinear) and module.input_scale is not None:
            norm = model.get_submodule(name.rsplit(".", 2)[0] + (".input_layernorm" if "self_attn" in name else ".pre_feedforward_layernorm"))
            module.input_scale.copy_(storable_scale(norm, "offset", module.input_scale.float()).half())
    checkpoint(model)
