"""`metric.trim`: the highest per-token divergences are left out of the mean, the untrimmed metric is
unchanged bit for bit, a trimmed metric never shares a cache entry with the untrimmed one, and a run
saved before the setting existed resumes untrimmed."""

from __future__ import annotations

import pytest
import torch
from conftest import SMOKE
from omegaconf import OmegaConf

from amq.errors import ConfigError
from amq.metrics.divergence import OutputDivergence, kl_rows, reference_stats
from amq.modeling.random_init import random_llama
from amq.run.resume import check_resumable, comparable_settings


def _perturb(model) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.model.layers[0].parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen).to(p.dtype))


@pytest.mark.parametrize("reference", ["probs", "hidden"])
def test_trim_leaves_out_the_highest_tokens(reference):
    model = random_llama("tiny", "cpu", dtype=torch.float32)
    tokens = torch.randint(0, model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(tokens).logits
    plain = OutputDivergence(model, tokens, kind="kl", batch_size=2, chunk_tokens=16, reference=reference)
    trimmed = OutputDivergence(model, tokens, kind="kl", batch_size=2, chunk_tokens=16, reference=reference, trim=0.1)
    _perturb(model)
    # per-token KL from scratch: 120 tokens, the 12 highest left out
    with torch.no_grad():
        rows = kl_rows(*reference_stats(before.flatten(0, 1)), model(tokens).logits.flatten(0, 1)).clamp_min(0).double()
    kept = torch.sort(rows).values[: rows.numel() - 12]
    assert trimmed.evaluate(model) == pytest.approx(float(kept.mean()), rel=1e-5)
    assert plain.evaluate(model) == pytest.approx(float(rows.mean()), rel=1e-5)
    assert trimmed.evaluate(model) < plain.evaluate(model)  # the highest tokens are gone


def test_zero_trim_is_the_plain_metric_and_keeps_its_cache_keys():
    model = random_llama("tiny", "cpu", dtype=torch.float32)
    tokens = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(2))
    plain = OutputDivergence(model, tokens, kind="kl", batch_size=2, chunk_tokens=16)
    zero = OutputDivergence(model, tokens, kind="kl", batch_size=2, chunk_tokens=16, trim=0.0)
    trimmed = OutputDivergence(model, tokens, kind="kl", batch_size=2, chunk_tokens=16, trim=0.01)
    _perturb(model)
    assert zero.evaluate(model) == plain.evaluate(model)  # bit for bit
    assert zero.settings() == plain.settings() and "trim" not in plain.settings()
    assert zero.description == plain.description
    # the evaluation cache keys on settings(), the sensitivity cache on the description
    assert trimmed.settings()["trim"] == 0.01 and trimmed.description != plain.description
    assert "1% of tokens left out" in trimmed.description
    # a subset of windows keeps the trim
    assert trimmed.subset(1).trim == 0.01


def test_a_run_saved_before_the_setting_resumes_untrimmed(tmp_path, compose_cfg):
    old = OmegaConf.create(OmegaConf.to_container(compose_cfg(SMOKE)))  # a plain copy: composed configs refuse deletions
    del old.metric["trim"]
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(old))
    check_resumable(tmp_path, comparable_settings(compose_cfg(SMOKE)), 2)  # untrimmed then and now
    with pytest.raises(ConfigError, match="metric.trim=0.01"):
        check_resumable(tmp_path, comparable_settings(compose_cfg([*SMOKE, "metric.trim=0.01"])), 2)
