"""Shrinking the middle widths' probed damage (`search.shrink_table`): a precise probe keeps its
value, a noisy one moves toward what its role's ratio to the lowest width predicts, and a table
that cannot be shrunk is refused with the setting named."""

import numpy as np
import pytest

from amq.errors import InvalidArgument
from amq.search.sensitivity import SensitivityTable
from amq.search.table_shrinkage import MIN_ROLE, role_of, shrink_middle_widths, shrink_role


def role_table(rng: np.random.Generator, n: int = 30, noise: float = 0.004, ratio: float = 0.15) -> tuple[SensitivityTable, dict[str, float]]:
    """A table of `n` gate_proj and `n` up_proj linears whose true 3-bit damage is `ratio` x their
    2-bit damage plus a spread of 20%, probed with independent noise of standard error `noise`;
    and the true 3-bit damages."""
    names = [f"model.layers.{i}.mlp.{r}" for r in ("gate_proj", "up_proj") for i in range(n)]
    low = rng.uniform(0.01, 0.06, len(names))
    true = ratio * low * rng.lognormal(0.0, 0.2, len(names))
    measured = true + rng.normal(0.0, noise, len(names))
    table = SensitivityTable(
        dict(zip(names, low)),
        0.3,
        2,
        4,
        "kl",
        1.0,
        mid={3: dict(zip(names, measured))},
        stderr={2: dict.fromkeys(names, noise), 3: dict.fromkeys(names, noise)},
    )
    return table, dict(zip(names, true))


def test_shrinking_brings_noisy_middle_widths_closer_to_the_truth():
    rng = np.random.default_rng(0)
    table, true = role_table(rng)
    shrunk = shrink_middle_widths(table)
    names = list(table.damage)
    err = {k: np.mean([(t.mid[3][n] - true[n]) ** 2 for n in names]) for k, t in (("measured", table), ("shrunk", shrunk))}
    assert err["shrunk"] < 0.6 * err["measured"]
    assert shrunk.mid_measured == table.mid  # what was probed stays on record
    assert shrunk.damage == table.damage and shrunk.stderr == table.stderr  # the lowest width is left alone
    back = SensitivityTable.from_dict(shrunk.to_dict())
    assert back.mid == shrunk.mid and back.mid_measured == table.mid and back.stderr == table.stderr


def test_a_precise_probe_keeps_its_value_and_a_noisy_one_moves_to_the_prior():
    low = np.array([0.02, 0.04, 0.03, 0.05, 0.01])
    measured = np.array([0.004, 0.006, -0.003, 0.012, 0.001])
    precise = np.full(5, 1e-6)
    post, ratio, tau = shrink_role(measured, low, precise)
    assert ratio > 0 and tau > 0
    np.testing.assert_allclose(post, measured, atol=1e-5)
    noisy = np.array([1e-6, 1e-6, 1.0, 1e-6, 1e-6])  # the third probe is pure noise
    post, ratio, _ = shrink_role(measured, low, noisy)
    assert post[2] == pytest.approx(ratio * low[2], rel=1e-3)
    np.testing.assert_allclose(post[[0, 1, 3, 4]], measured[[0, 1, 3, 4]], atol=1e-4)


def test_small_roles_keep_their_measured_values():
    rng = np.random.default_rng(1)
    table, _ = role_table(rng, n=MIN_ROLE - 1)
    assert shrink_middle_widths(table).mid == table.mid
    assert role_of("model.layers.3.self_attn.q_proj") == "q_proj"


def test_a_table_that_cannot_be_shrunk_is_refused():
    rng = np.random.default_rng(2)
    table, _ = role_table(rng)
    lowest_only = SensitivityTable(table.damage, 0.3, 2, 4, "kl", 1.0)
    with pytest.raises(InvalidArgument, match="middle widths.*sensitivity_widths=all"):
        shrink_middle_widths(lowest_only)
    no_errors = SensitivityTable(table.damage, 0.3, 2, 4, "kl", 1.0, mid=table.mid)
    with pytest.raises(InvalidArgument, match="3-bit probes carry no standard errors.*per-token values"):
        shrink_middle_widths(no_errors)
