"""Re-solved moves (`search.resolve_moves`): each target's allocation solved again, as a knapsack,
on the predictor's predicted single-linear changes around its incumbent.

SmolLM2-135M's real-shaped space and the additive damage of tests/test_target_moves.py; the
predictors here are exact or ridge stand-ins, so each search runs in well under a second.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from test_target_moves import HALF, TARGETS, Ridge, _damage, _search, _space

from amq.errors import ConfigError
from amq.search.archive import Archive
from amq.search.knapsack import knapsack_allocations
from amq.search.pareto import best_under_target
from amq.search.resolved_moves import resolved_moves, single_gene_changes


def _additive(space):
    """An exact predictor of the additive world the stand-in search measures."""
    damage = _damage(len(space.linears))
    return lambda genes: (damage[None, :] * 4.0 ** -space.gene_bits(genes).astype(float)).sum(axis=1)


def test_single_gene_changes_are_the_predicted_differences_from_the_incumbent():
    space = _space()
    predict, incumbent = _additive(space), space.uniform(4)
    changes = single_gene_changes(space, incumbent, predict)
    i = int(np.argmax(space.sizes))
    for c in range(int(space.sizes[i])):
        g = incumbent.copy()
        g[i] = c
        assert changes[i, c] == pytest.approx(predict(g[None, :])[0] - predict(incumbent[None, :])[0], rel=1e-9, abs=1e-15)
    assert (changes[np.arange(space.n_genes), incumbent] == 0).all()
    lacking = np.arange(changes.shape[1])[None, :] >= space.sizes[:, None]
    assert np.isinf(changes[lacking]).all() and np.isfinite(changes[~lacking]).all()


@pytest.mark.parametrize("target", TARGETS)
def test_with_an_exact_predictor_the_free_solution_is_the_knapsack_optimum(target):
    space = _space()
    predict, incumbent = _additive(space), space.uniform(3)
    moves = resolved_moves(space, incumbent, target, predict, penalties=(0.0,))
    assert len(moves) == 1
    # the knapsack on each gene's own damage per width, which the additive world makes exact
    lacking = np.arange(space.choice_bits.shape[1])[None, :] >= space.sizes[:, None]
    own = np.where(lacking, np.inf, _damage(space.n_genes)[:, None] * 4.0 ** -space.choice_bits.astype(float))
    expected = knapsack_allocations(space, own, [target])[0]
    assert predict(moves)[0] == pytest.approx(predict(expected[None, :])[0], rel=1e-9)
    assert space.avg_bits(moves)[0] <= target + 1e-9


def test_higher_penalties_change_fewer_linears_and_every_move_is_new_and_under_the_target():
    space, target = _space(), 4.25
    pool = space.random(np.random.default_rng(1), 50, (target - 0.1, target))
    incumbent = pool[np.argmax(space.avg_bits(pool))]
    predict = _additive(space)
    changed = []
    for p in (0.0, 0.25, 1.0, 4.0, 64.0):
        moves = resolved_moves(space, incumbent, target, predict, penalties=(p,))
        assert (space.avg_bits(moves) <= target + 1e-9).all()
        assert not (moves == incumbent[None, :]).all(axis=1).any()
        changed.append(int((moves != incumbent[None, :]).sum()) if len(moves) else 0)
    assert changed == sorted(changed, reverse=True) and changed[0] > changed[-1]
    ladder = resolved_moves(space, incumbent, target, predict)
    assert len({space.key(g) for g in ladder}) == len(ladder) >= 2


def test_in_the_loop_each_target_gets_one_re_solved_move_per_iteration_and_a_rerun_repeats_it(caplog):
    space = _space()
    caplog.set_level("INFO", logger="amq.search.loop")
    settings = dataclasses.replace(HALF, resolve_moves=True)
    archives = []
    for _ in range(2):
        archive = Archive(space)
        _search(space, archive, settings).run()
        archives.append([(space.key(r.genes), r.metric, r.iteration) for r in archive.records])
    assert archives[0] == archives[1]
    lines = [m.getMessage() for m in caplog.records if "re-solved" in m.getMessage()]
    assert len(lines) == 2 * settings.iterations
    assert all(f"{len(TARGETS)} of them re-solved" in line for line in lines)
    for it in range(1, settings.iterations + 1):
        before = [r for r in archive.records if r.iteration < it]
        y = np.array([r.metric for r in before])
        bits = np.array([r.avg_bits for r in before])
        batch = [r for r in archive.records if r.iteration == it]
        ridge = Ridge(0).fit(space.features(np.stack([r.genes for r in before])), y)  # the loop's predictor, refitted
        for k, t in enumerate(TARGETS):  # the first round of the round robin: one re-solved move per target
            inc = before[best_under_target(y, bits, t)].genes
            assert batch[k].avg_bits <= t + 1e-9
            moves = resolved_moves(space, inc, t, lambda g: ridge.predict(space.features(g)))
            assert space.key(batch[k].genes) in {space.key(m) for m in moves}


def test_re_solved_moves_without_target_slots_are_refused_naming_the_setting():
    with pytest.raises(ConfigError, match=r"^resolve_moves: .*\(valid: target_slots > 0"):
        dataclasses.replace(HALF, target_slots=0.0, resolve_moves=True)


def test_the_lean_preset_is_the_measured_command_line(compose_cfg):
    """experiment=lean_234 composes to the settings docs/benchmarks.md measured with overrides."""
    measured = [
        "budget=standard",
        "search.bits=[2,3,4]",
        "search.targets=[3.0,3.5,4.0]",
        "search.bits_window=null",
        "budget.seq_len=512",
        "budget.n_initial_random=27",
        "budget.sensitivity_seeds=27",
        "budget.sensitivity_samples=1",
        "search.sensitivity_widths=estimated",
        "budget.n_samples=4",
        "budget.iterations=8",
        "metric=kl",
        "search.predictor_prior=table",
        "predictor.kernel=linear",
        "search.resolve_moves=true",
        "search.confirm.samples=3",
        "search.confirm.candidates=3",
        "search.confirm.band=0.05",
    ]
    preset, overrides = compose_cfg(["experiment=lean_234"]), compose_cfg(measured)
    for group in ("search", "budget", "metric", "predictor", "quantizer", "model"):
        assert preset[group] == overrides[group], group
    assert compose_cfg([]).search.resolve_moves is False
