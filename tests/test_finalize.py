"""The finalize stage: selection never exceeds a budget, exports reload and reproduce, bad dirs fail."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import SMOKE, main_in_process

from amq.bits import BitConfig
from amq.errors import ConfigError
from amq.finalize.selection import Candidate, front_extras, select_for_targets
from amq.quantizers import llamacpp


def _cand(bits: float, metric: float, meta: float = 0.5) -> Candidate:
    return Candidate(BitConfig({"a": int(bits)}, 64), bits + meta, bits, metric, 0)


def test_selection_never_exceeds_the_budget_and_takes_the_best_metric():
    cands = [_cand(3.2, 0.30), _cand(3.6, 0.10), _cand(3.9, 0.20), _cand(4.4, 0.05)]
    sel = select_for_targets(cands, [4.1, 4.5, 5.0], "with_meta")
    assert [s.candidate.metric for s in sel] == [0.10, 0.10, 0.05]
    assert all(s.candidate.avg_bits <= s.target + 1e-9 for s in sel)
    assert select_for_targets(cands, [4.0], "with_meta")[0].candidate.metric == 0.30
    sel = select_for_targets(cands, [4.0], "weights_only")  # the weights-only figure bounds it now
    assert sel[0].candidate.avg_bits_weights_only == 3.6 and sel[0].candidate.metric == 0.10


def test_unreachable_target_names_the_smallest_configuration():
    with pytest.raises(ConfigError, match=r"finalize.targets.*smallest has 3.700"):
        select_for_targets([_cand(3.2, 0.3)], [3.0], "with_meta")
    with pytest.raises(ConfigError, match="finalize.bits_convention"):
        select_for_targets([_cand(3.2, 0.3)], [4.0], "per_weight")


def test_front_extras_are_nondominated_and_not_already_chosen():
    cands = [_cand(3.0 + 0.1 * i, 1.0 - 0.05 * i) for i in range(10)] + [_cand(3.5, 0.99)]
    extra = front_extras(cands, [cands[9]], 3, "with_meta")
    assert len(extra) == 3 and cands[9] not in extra and all(c.metric < 0.99 or c.avg_bits != 4.0 for c in extra)


def test_proxy_fidelity_counts_each_configuration_once(recwarn):
    """Two targets that selected one configuration, and the uniform baseline equal to it, are one
    point; with too few distinct points, or all-equal numbers, no correlation and no warning."""
    from amq.evaluation.report import fidelity

    def row(kind: str, bits: float, proxy: float, ppl: float) -> dict:
        return {"kind": kind, "avg_bits": bits, "proxy_jsd": proxy, "perplexity": {"wiki": ppl}}

    same = [row("target", 4.5, 0.03, 33.0), row("target", 4.5, 0.03, 33.0), row("uniform", 4.5, 0.03, 33.0)]
    assert fidelity([*same, row("unquantized", 16.0, 0.0, 25.0)], "proxy_jsd")["n"] == 1
    got = fidelity([*same, row("front", 3.6, 0.08, 90.0), row("target", 4.0, 0.05, 50.0)], "proxy_jsd")
    assert got["n"] == 3 and got["wiki"]["spearman"] == pytest.approx(1.0)
    flat = fidelity([row("target", b, 0.03, 33.0) for b in (4.0, 4.5, 5.0)], "proxy_jsd")
    assert flat["n"] == 3 and flat["wiki"] == {"spearman": None, "kendall_tau": None}
    assert not recwarn.list


def test_llama_cpp_types_cover_every_llama_linear():
    names = [f"model.layers.{i}.{r}" for i in range(2) for r in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")]
    types = llamacpp.tensor_types(BitConfig({n: b for n, b in zip(names, [2, 3, 4, 5, 6, 8])}, 64))
    assert types["blk.0.attn_q.weight"] == "q2_K" and types["blk.1.ffn_down.weight"] == "q8_0"
    text = llamacpp.tensor_type_file(types)
    assert "blk\\.1\\.attn_output\\.weight=q6_K" in text
    with pytest.raises(ValueError):
        llamacpp.tensor_types(BitConfig({"model.layers.0.mlp.down_proj": 7}, 64))


def test_evaluate_refuses_a_directory_without_a_bit_configuration(tmp_path, capfd):
    from amq.cli.evaluate import main

    proc = main_in_process("amq-evaluate", main, [str(tmp_path)], capfd)
    assert proc.returncode == 2
    assert "amq_quant.json" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_search_exports_models_that_reload_and_reproduce(searched, plain_python, tmp_path, capfd):
    """The session's finalized smoke search (conftest: HQQ at the default budgets, one extra front
    point), copied so that `amq-evaluate` writes into the copy. `amq-evaluate` runs in this process,
    which never held these models (the search wrote them in its own; tests/test_tracking_path.py
    runs the command in a new process)."""
    from amq.cli.evaluate import main

    run = Path(shutil.copytree(searched, tmp_path / "run", ignore=shutil.ignore_patterns("finalized", "wandb")))
    summary = json.loads((run / "summary.json").read_text())
    report = json.loads((run / "evaluation.json").read_text())
    targets = [r for r in report["rows"] if r["kind"] == "target"]
    assert {f"{r['target']:g}" for r in targets} == set(summary["finalize"]["models"]) == {"4", "4.5", "5"}
    kinds = {r["kind"] for r in report["rows"]}
    assert {"unquantized", "uniform", "front"} <= kinds
    for r in targets:
        assert r["avg_bits"] <= r["target"] + 1e-9  # a budget is never exceeded
        d = run / "models" / f"{r['target']:g}"
        for name in (
            "amq_packed.safetensors",
            "compressed-tensors/model.safetensors",
            "config.json",
            "tokenizer.json",
            "bit_config.json",
            "amq_quant.json",
            "README.md",
            "eval.json",
            "llama_cpp_tensor_types.txt",
        ):
            assert (d / name).is_file(), name
        assert 0 < r["bytes_on_disk"] < r["bytes_bf16"]
        assert json.loads((d / "bit_config.json").read_text())["version"] == 1
    assert report["proxy_fidelity"]["n"] >= 3
    assert "(210 from the proxy's cache)" in (run / "train_search.log").read_text()  # HQQ as the proxy ran it: not quantized twice
    # amq-evaluate reloads every exported model and reproduces its recorded perplexity
    proc = main_in_process("amq-evaluate", main, [str(run), "--threads", "2"], capfd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in targets:
        rep = json.loads((run / "models" / f"{r['target']:g}" / "eval.json").read_text())["reproduction"]
        assert rep and all(x["rel_diff"] < 1e-3 for x in rep.values())
    check_plain_transformers_reproduces(plain_python, run, [f"{r['target']:g}" for r in targets], tmp_path)


# The plain-transformers side: a process that never imports amq, scoring as amq's perplexity does.
PLAIN_LOADER = """
import json, math, sys, torch, transformers
assert not any(m == "amq" or m.startswith("amq.") for m in sys.modules)
out = {}
for d, windows_file in json.loads(sys.argv[1]).items():
    try:
        transformers.AutoModelForCausalLM.from_pretrained(d.rsplit("/compressed-tensors", 1)[0])
        out[d + ":amq-dir"] = "loaded"
    except Exception as exc:
        out[d + ":amq-dir"] = type(exc).__name__ + ": " + str(exc).splitlines()[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    assert not any(m == "amq" or m.startswith("amq.") for m in sys.modules)
    ppl = {}
    for name, w in torch.load(windows_file).items():
        nll, n = 0.0, 0
        with torch.no_grad():
            for row in w:
                logits = model(row[None]).logits[0, :-1].float()
                nll += float(torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum")); n += len(row) - 1
        ppl[name] = math.exp(nll / n)
    out[d] = ppl
print(json.dumps(out))
"""


def check_plain_transformers_reproduces(plain_python, run, targets: list[str], tmp_path) -> None:
    """Every exported model's compressed-tensors/ checkpoint loads in plain transformers (amq never
    imported) and gives the held-out perplexity of its eval.json (within 0.1%); the amq-packed directory
    itself is refused rather than loaded with random weights."""
    import torch
    from transformers import AutoTokenizer

    from amq.config.compose import build, compose_config
    from amq.data.corpora import keep_parsed
    from amq.evaluation.perplexity import PerplexityProtocol, perplexity_windows

    cfg = compose_config(SMOKE)
    splits = keep_parsed(build(cfg.data, "data"), cfg.paths.cache_dir).load()
    jobs, recorded = {}, {}
    for t in targets:
        d = run / "models" / t
        ev = json.loads((d / "eval.json").read_text())
        proto = ev["protocol"]["perplexity"]
        protocol = PerplexityProtocol(proto["window"], proto["max_windows"], proto["add_bos"])
        tok = AutoTokenizer.from_pretrained(d)
        windows = {name: perplexity_windows(tok, docs, protocol) for name, docs in splits.heldout.items()}
        torch.save(windows, tmp_path / f"windows_{t}.pt")
        jobs[str(d / "compressed-tensors")] = str(tmp_path / f"windows_{t}.pt")
        recorded[str(d / "compressed-tensors")] = {name: r["perplexity"] for name, r in ev["perplexity"].items()}
        card = (d / "README.md").read_text()
        assert "compressed-tensors/" in card and "vLLM" in card
    proc = plain_python.run(PLAIN_LOADER, [json.dumps(jobs)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for d, ppl in recorded.items():
        assert got[d + ":amq-dir"].startswith("OSError"), got[d + ":amq-dir"]  # refused loudly, never random weights
        for name, value in ppl.items():
            # the Done-when asks 1%; the checkpoint holds amq's weights, so they agree to rounding (measured: every digit)
            assert abs(got[d][name] / value - 1) < 1e-3, (d, name, got[d][name], value)
