"""Search-space pruning's rule: the AMQ reference compares each probe's own metric (JSD of the
model with one linear at the lowest width against the unquantized model) with threshold x the
median, so the error of the all-highest configuration is part of every score; amq's former rule
subtracted it. When that baseline is large against a single linear's damage, as with a lossy top
width, the reference's rule pins only outliers.
"""

from __future__ import annotations

import numpy as np
import pytest

from amq.config.compose import build
from amq.errors import ConfigError, InvalidArgument
from amq.search.sensitivity import Pruning, SensitivityTable


def _table(baseline: float, n: int = 210, seed: int = 0) -> SensitivityTable:
    """Lognormal per-linear damages (a heavy right tail, as measured) over an all-highest baseline."""
    damage = np.random.default_rng(seed).lognormal(np.log(1e-3), 1.0, n)
    return SensitivityTable({f"l{i}": float(d) for i, d in enumerate(damage)}, baseline, 3, 8, "jsd", 0.0)


def _reference_rule(table: SensitivityTable, threshold: float) -> list[str]:
    """The reference's pass_linear_list: its table holds each probe's loss, pinned when loss > median(loss) x threshold."""
    loss = {n: d + table.baseline for n, d in table.damage.items()}
    median = np.median(list(loss.values()))
    return sorted(n for n in loss if loss[n] > median * threshold)


@pytest.mark.parametrize("baseline", [0.0, 7e-4, 1e-2])
def test_the_default_rule_is_the_references(baseline):
    table = _table(baseline)
    assert Pruning().score == "total"
    assert Pruning(threshold=2.0).pruned(table) == _reference_rule(table, 2.0)


def test_a_baseline_raises_the_references_bar_and_the_damage_rule_ignores_it():
    """total > 2 x median(total) <=> damage > 2 x median(damage) + baseline."""
    counts = {b: (len(Pruning().pruned(_table(b))), len(Pruning(score="damage").pruned(_table(b)))) for b in (0.0, 7e-4, 1e-2)}
    assert counts[0.0][0] == counts[0.0][1]  # a lossless top width: the two rules agree
    assert len({d for _, d in counts.values()}) == 1  # the damage rule does not see the baseline
    assert counts[1e-2][0] < counts[7e-4][0] < counts[0.0][0]
    table = _table(7e-4)
    bar = 2 * np.median(list(table.damage.values())) + table.baseline
    assert Pruning().pruned(table) == sorted(n for n, d in table.damage.items() if d > bar)


def test_threshold_zero_disables_either_rule():
    for score in ("total", "damage"):
        assert Pruning(threshold=0, score=score).pruned(_table(1e-3)) == []


def test_an_unknown_score_is_refused_and_named_as_the_setting(compose_cfg):
    with pytest.raises(InvalidArgument):
        Pruning(score="absolute")
    cfg = compose_cfg(["search.pruning.score=absolute"])
    with pytest.raises(ConfigError) as info:
        build(cfg.search.pruning, "search.pruning")
    assert info.value.setting == "search.pruning.score" and "total or damage" in str(info.value)
    for overrides, score in (([], "total"), (["search.pruning.score=damage"], "damage"), (["experiment=paper_llama2_7b"], "total")):
        assert build(compose_cfg(overrides).search.pruning, "search.pruning").score == score
