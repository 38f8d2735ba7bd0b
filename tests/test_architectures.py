"""Layouts users bring, as tiny random-weight models built from their transformers configs: each is
covered by the layout discovery, quantized by AWQ at mixed widths (input scales folded wherever
the architecture allows), exported, and reloaded by amq with the same logits.

Dense layouts also reload in plain transformers (a process that never imports amq) from their
compressed-tensors checkpoint. Mixture-of-experts (fused 3-D experts in transformers) and GPT-2
(Conv1D) are searched as per-layer linears, which transformers does not build for them: their
compressed-tensors export is refused in one line, and amq's own directory serves them.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from test_compressed_tensors import LOADER, _tokenizer

from amq.bits import BitConfig
from amq.errors import InvalidArgument
from amq.modeling.discovery import coverage, discover_layout
from amq.modeling.normalize import as_linear_layers
from amq.quantizers import awq
from amq.quantizers.awq import AWQFinalizer
from amq.quantizers.compressed_tensors import export_compressed_tensors
from amq.quantizers.export import load_quantized, write_model_dir
from amq.quantizers.folding import fold_into_quantized_linears
from amq.quantizers.packed import PackedLinear, replace_linears

pytest.importorskip("compressed_tensors")

GROUP = 32
VOCAB = 128
DENSE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
ARCHITECTURES = {  # name -> (config class, model class, config arguments, linears whose input scale must fold)
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, DENSE, {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"}),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, DENSE, {"q_proj", "gate_proj", "down_proj"}),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, DENSE, {"q_proj", "gate_proj", "down_proj"}),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, {**DENSE, "head_dim": 16}, {"q_proj", "gate_proj", "down_proj"}),
    "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, {**DENSE, "head_dim": 16}, {"q_proj", "gate_proj", "down_proj"}),
    "phi3 (fused qkv_proj, gate_up_proj)": (T.Phi3Config, T.Phi3ForCausalLM, {**DENSE, "pad_token_id": 0}, {"qkv_proj", "gate_up_proj"}),
    "opt": (
        T.OPTConfig,
        T.OPTForCausalLM,
        dict(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64),
        {"q_proj", "out_proj", "fc1", "fc2"},  # multi-head: out_proj folds into v_proj; ReLU lets fc2 fold into fc1
    ),
    "gpt-neox": (
        T.GPTNeoXConfig,
        T.GPTNeoXForCausalLM,
        dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
        {"query_key_value", "dense_h_to_4h"},
    ),
    "falcon (parallel attention and MLP)": (
        T.FalconConfig,
        T.FalconForCausalLM,
        dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
        set(),  # one norm feeds two stages: no shared scale, so AWQ scales neither
    ),
}
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=64)
LINEARS_ONLY_IN_AMQ = {  # searched as linears transformers does not build: no compressed-tensors checkpoint
    "mixtral (fused experts)": (T.MixtralConfig, T.MixtralForCausalLM, {**DENSE, "num_local_experts": 4, "num_experts_per_tok": 2}, {"q_proj"}),
    "qwen2-moe (shared expert)": (
        T.Qwen2MoeConfig,
        T.Qwen2MoeForCausalLM,
        {**DENSE, **MOE, "num_experts": 4, "shared_expert_intermediate_size": 128},
        {"q_proj", "shared_expert.down_proj"},  # the norm also feeds the router and experts: gate/up unscaled
    ),
    "qwen3-moe": (T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM, {**DENSE, **MOE, "num_experts": 4, "head_dim": 16}, {"q_proj"}),
    "gpt2 (Conv1D)": (T.GPT2Config, T.GPT2LMHeadModel, dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4), {"c_attn", "c_fc"}),
}
ARCHITECTURES.update(LINEARS_ONLY_IN_AMQ)
TOKENS = torch.arange(3, 67).view(2, 32) % VOCAB
TOLERANCE = 5e-4  # max |logit difference| in float32 (folded scales round once more, in float16)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, plain_python) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("arch")
    torch.save(TOKENS, root / "tokens.pt")
    calib = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    out = {}
    for i, (name, (config_cls, model_cls, kwargs, _)) in enumerate(ARCHITECTURES.items()):
        torch.manual_seed(0)
        model = model_cls(config_cls(**kwargs)).eval().requires_grad_(False)
        as_linear_layers(model)  # as amq loads every model
        layout = discover_layout(model)
        covered = coverage(model, layout).fraction
        bits = {li.name: (2, 3, 4, 8)[j % 4] for j, li in enumerate(layout.linears)}
        moved: list[str] = []  # scales AWQ folded into the quantized linear before them itself

        def recorded(*args) -> list[str]:
            names = fold_into_quantized_linears(*args)
            moved.extend(names)
            return names

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(awq, "fold_into_quantized_linears", recorded)
            quants = AWQFinalizer(n_grid=5).quantize(model, layout, bits, GROUP, calib)
        replace_linears(model, quants, torch.float32)
        amq_dir = write_model_dir(root / f"amq{i}", model, _tokenizer(), BitConfig(bits, GROUP), {"name": "awq"})
        reloaded = load_quantized(amq_dir)
        with torch.no_grad():
            logits = model(input_ids=TOKENS).logits.float()
            again = reloaded(input_ids=TOKENS).logits.float()
        kept = [n for n, m in reloaded.named_modules() if isinstance(m, PackedLinear) and m.input_scale is not None]
        scaled = {".".join(parts[i:]) for parts in (n.split(".") for n in [*kept, *moved]) for i in range(len(parts))}  # every dotted suffix
        out[name] = {"coverage": covered, "logits": logits, "again": again, "scaled": scaled, "moved_kept": set(moved) & set(kept)}
        if name in LINEARS_ONLY_IN_AMQ:
            with pytest.raises(InvalidArgument, match="not nn.Linear layers") as refused:
                export_compressed_tensors(amq_dir, root / f"ct{i}")
            out[name]["refused"] = str(refused.value)
            assert not (root / f"ct{i}").exists()  # nothing half-written
            continue
        out[name]["dir"] = export_compressed_tensors(amq_dir, root / f"ct{i}")
    dirs = [str(c["dir"]) for c in out.values() if "dir" in c]
    proc = plain_python.run(LOADER, [json.dumps(dirs), str(root / "tokens.pt")], timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for c in out.values():
        if "dir" in c:
            c["plain"] = torch.load(c["dir"] / "logits.pt")
    return out


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architecture_is_searched_whole_and_exports_to_plain_transformers(exported, name):
    case = exported[name]
    assert case["coverage"] == 1.0 if name not in LINEARS_ONLY_IN_AMQ else case["coverage"] > 0.99  # routers: 16 bits
    assert torch.equal(case["again"], case["logits"]), "amq's reload differs from the model it saved"
    must_fold = ARCHITECTURES[name][3]
    assert must_fold <= case["scaled"] if must_fold else not case["scaled"], (name, case["scaled"])
    assert not case["moved_kept"], "a scale folded into its producer must leave its layer"
    if name in LINEARS_ONLY_IN_AMQ:
        return
    diff = float((case["plain"] - case["logits"]).abs().max())
    assert diff <= TOLERANCE, f"{name}: plain transformers differs by {diff:.3g} (logits up to {float(case['logits'].abs().max()):.3g})"
