"""Zero-shot accuracy through lm-eval, offline, on a real BIG-bench task and the real SmolLM2.

The BIG-bench source package (about 358 MB, about a minute from PyPI) is downloaded into the test
session's cache, unless AMQ_BIGBENCH_SDIST, AMQ_TEST_CACHE_DIR or the user cache provides it
(tests/conftest.py); where the index does not serve it, the tests that need it are skipped.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import SMOKE
from torch import nn

from amq.config.compose import build
from amq.errors import ConfigError
from amq.evaluation.bigbench import OFFLINE_ENV, SDIST_ENV, prepare_tasks
from amq.evaluation.zeroshot import zero_shot
from amq.hub import hub_reachable

TASK = "bigbench_social_iqa"
LIMIT = 20


@pytest.fixture(scope="module")
def smollm2(compose_cfg):
    cfg = compose_cfg(["model=smollm2", *SMOKE])
    torch.set_num_threads(int(cfg.num_threads))
    cache = Path(cfg.paths.cache_dir)
    return build(cfg.model.source, "model").load(cache), cache


@pytest.fixture(scope="module")
def social_iqa(smollm2, bigbench_tasks):
    lm, cache = smollm2
    return zero_shot(lm.model, lm.tokenizer, [TASK], cache, limit=LIMIT)


def test_offline_task_gives_finite_accuracies_on_limit_documents(social_iqa):
    r = social_iqa[TASK]
    assert r["n"] == LIMIT
    assert r["source"] == "bigbench-1.0.0 social_iqa"
    for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "chance"):
        assert math.isfinite(r[key]) and 0.0 <= r[key] <= 1.0, (key, r[key])
    assert 0.3 < r["chance"] < 0.5  # 2-3 choices per question


def test_same_call_twice_gives_the_same_results(smollm2, social_iqa):
    lm, cache = smollm2
    assert zero_shot(lm.model, lm.tokenizer, [TASK], cache, limit=LIMIT) == social_iqa


def test_model_and_tokenizer_are_used_as_given(smollm2, social_iqa):
    lm, _ = smollm2
    assert {p.dtype for p in lm.model.parameters()} == {lm.compute.dtype}  # zero-shot runs the model in its own dtype
    assert {p.device.type for p in lm.model.parameters()} == {lm.device.type}
    assert not lm.model.training


def _choice_logprobs(model, tokenizer, docs: list[dict], batch: int = 8) -> list[list[float]]:
    """Per document, the summed log-prob of each choice after the prompt, tokenized as lm-eval does."""
    seqs = [(i, len(tokenizer.encode(d["prompt"].rstrip())), tokenizer.encode(d["prompt"] + c)) for i, d in enumerate(docs) for c in d["choices"]]
    out: list[list[float]] = [[] for _ in docs]
    for k in range(0, len(seqs), batch):
        chunk = seqs[k : k + batch]
        width = max(len(ids) for *_, ids in chunk)
        # Right padding needs no mask: causal attention never looks ahead at it.
        x = torch.tensor([ids + [0] * (width - len(ids)) for *_, ids in chunk])
        with torch.no_grad():
            logp = F.log_softmax(model(x).logits.float(), dim=-1)
        for row, (i, n_ctx, ids) in enumerate(chunk):
            target = torch.tensor(ids[n_ctx:])
            out[i].append(float(logp[row, n_ctx - 1 : len(ids) - 1].gather(1, target[:, None]).sum()))
    return out


def test_accuracy_is_the_argmax_of_choice_likelihoods(smollm2, social_iqa):
    """lm-eval scores each choice as BIG-bench does: the continuation right after the prompt."""
    lm, cache = smollm2
    (task,) = prepare_tasks([TASK], cache)
    docs = task.docs()[:LIMIT]
    scores = _choice_logprobs(lm.model, lm.tokenizer, docs)
    hits = sum(int(max(range(len(s)), key=s.__getitem__) == d["label"]) for s, d in zip(scores, docs))
    # Different batching can flip a near-tie in bf16; allow one document either way.
    assert abs(social_iqa[TASK]["acc"] * LIMIT - hits) <= 1


def test_first_document_is_the_task_files_first_example(smollm2, bigbench_tasks):
    _, cache = smollm2
    (task,) = prepare_tasks([TASK], cache)
    docs = task.docs()
    assert len(docs) == 1935  # 1,954 examples, 19 of them duplicates
    assert docs[0]["prompt"] == "\nQ: Tracy didn't go home that evening and resisted Riley's attacks. What does Tracy need to do before this? \nA: "
    assert docs[0]["choices"] == ["Make a new plan", "Go home and see Riley", "Find somewhere to go"]
    assert docs[0]["label"] == 2


class _PackedLinear(nn.Module):
    """A stand-in for an exported quantized layer: no nn.Linear, no Parameter, only a buffer."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.register_buffer("packed", linear.weight.detach().clone())
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.packed, self.bias)


def test_model_with_custom_modules_is_accepted(smollm2, social_iqa):
    lm, cache = smollm2
    block = lm.model.model.layers[0]
    original = block.mlp.down_proj
    block.mlp.down_proj = _PackedLinear(original)
    try:
        res = zero_shot(lm.model, lm.tokenizer, [TASK], cache, limit=LIMIT)
    finally:
        block.mlp.down_proj = original
    assert res == social_iqa


def test_unknown_task_lists_the_valid_names(smollm2):
    lm, cache = smollm2
    with pytest.raises(ConfigError) as err:
        zero_shot(lm.model, lm.tokenizer, ["social_iqa_typo"], cache)
    msg = str(err.value)
    assert msg.startswith("finalize.tasks:") and "social_iqa_typo" in msg
    assert TASK in msg and "lm-eval ls tasks" in msg  # amq's offline tasks, and any task lm-eval knows


def test_hub_task_without_network_fails_fast(smollm2, monkeypatch):
    if hub_reachable():
        pytest.skip("the dataset hub is reachable from here")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    lm, cache = smollm2
    with pytest.raises(ConfigError, match="piqa.*unreachable"):
        zero_shot(lm.model, lm.tokenizer, ["piqa"], cache)


def test_missing_package_without_download_says_how_to_fetch_it(smollm2, tmp_path, monkeypatch):
    monkeypatch.setenv(OFFLINE_ENV, "1")
    monkeypatch.delenv(SDIST_ENV, raising=False)
    lm, _ = smollm2
    with pytest.raises(ConfigError) as err:
        zero_shot(lm.model, lm.tokenizer, [TASK], tmp_path, limit=LIMIT)
    msg = str(err.value)
    assert str(tmp_path / "bigbench") in msg and "pip download --no-deps" in msg and "bigbench==1.0.0" in msg
    assert not list((tmp_path / "bigbench").glob("*.tar.gz")), "nothing half-written"


@pytest.mark.parametrize("content", [None, b"not the source package"])
def test_bad_package_path_is_refused(tmp_path, monkeypatch, content):
    path = tmp_path / "bigbench-1.0.0.tar.gz"
    if content is not None:
        path.write_bytes(content)
    monkeypatch.setenv(SDIST_ENV, str(path))
    with pytest.raises(ConfigError, match=SDIST_ENV):
        prepare_tasks([TASK], tmp_path / "cache")
