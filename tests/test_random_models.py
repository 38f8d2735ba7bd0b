"""Random-weight models of published architectures (`model=random`): every preset builds and runs,
its identity is deterministic, full-size shapes match the published parameter counts, and a whole
search runs on one through the real config. Their quality numbers mean nothing; the mechanics do."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from amq.errors import InvalidArgument
from amq.modeling.random_init import PRESETS, RandomArchitecture, build_model

TINY = sorted(name for name in PRESETS if name.startswith("tiny-"))
PUBLISHED_PARAMETERS = {"llama2-7b": 6.74e9, "llama3-8b": 8.03e9, "qwen2.5-7b": 7.62e9}  # each model card's count


@pytest.fixture(scope="module")
def cache_dir() -> Path:
    """The session's cache (tests/conftest.py): the SmolLM2 tokenizer is converted there once."""
    return Path(os.environ["AMQ_CACHE_DIR"])


def _load(cache_dir: Path, arch: str = "tiny-llama", **kwargs):
    return RandomArchitecture(arch, dtype="float32", device=kwargs.pop("device", "cpu"), **kwargs).load(cache_dir)


@pytest.mark.parametrize("arch", TINY)
def test_tiny_preset_builds_and_runs_with_every_token_id(cache_dir, arch):
    lm = _load(cache_dir, arch)
    n_ids = len(lm.tokenizer)
    assert lm.name == f"random-{arch}" and lm.model.config.model_type == PRESETS[arch][0]
    assert lm.model.get_input_embeddings().num_embeddings >= n_ids and not lm.model.training
    ids = torch.tensor([[0, 1, 2, 100, 1000, 10000, n_ids - 2, n_ids - 1]])  # the tokenizer's last ids included
    with torch.no_grad():
        logits = lm.model(input_ids=ids).logits
    assert logits.shape[:2] == (1, 8) and torch.isfinite(logits).all()


def test_weights_and_fingerprint_are_deterministic_and_follow_seed_and_overrides(cache_dir):
    first, again, other = _load(cache_dir), _load(cache_dir), _load(cache_dir, seed=1)
    assert first.fingerprint == again.fingerprint and len(first.fingerprint) == 16
    weights = [lm.model.model.layers[0].mlp.down_proj.weight for lm in (first, again, other)]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])
    assert other.fingerprint != first.fingerprint
    deeper = _load(cache_dir, overrides={"num_hidden_layers": 3})
    assert len(deeper.model.model.layers) == 3 and deeper.fingerprint != first.fingerprint


def test_unknown_preset_names_arch_and_the_presets_before_any_work(tmp_path):
    with pytest.raises(InvalidArgument) as info:
        RandomArchitecture("llama9000").load(tmp_path)
    assert info.value.argument == "arch" and "llama9000" in info.value.problem
    assert all(name in info.value.valid for name in PRESETS)
    assert not any(tmp_path.iterdir()), "the tokenizer was prepared for a preset that does not exist"
    with pytest.raises(InvalidArgument) as info:
        RandomArchitecture("tiny-llama", overrides=[4]).load(tmp_path)
    assert info.value.argument == "overrides"


@pytest.mark.parametrize("arch", sorted(PUBLISHED_PARAMETERS))
def test_full_size_presets_have_the_published_parameter_count(arch):
    model = build_model(arch, "meta")  # shapes only: no memory
    n = sum(p.numel() for p in model.parameters())
    assert n == pytest.approx(PUBLISHED_PARAMETERS[arch], rel=0.03)
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_full_size_presets_keep_their_vocabulary_unless_the_tokenizer_needs_more(cache_dir, caplog):
    with caplog.at_level(logging.WARNING):
        llama3 = _load(cache_dir, "llama3-8b", device="meta")
        assert "vocab_size raised" not in caplog.text
        llama2 = _load(cache_dir, "llama2-7b", device="meta")
    assert llama3.model.config.vocab_size == 128256
    assert llama2.model.config.vocab_size == len(llama2.tokenizer) > 32000  # SmolLM2's ids do not fit Llama-2's 32000
    assert "vocab_size raised from 32000" in caplog.text and "meaningless" in caplog.text
