"""Sensitivity-table allocators on synthetic damage tables: the knapsack DP is optimal (checked
against brute force), greedy respects every budget, and both stay inside the space."""

import itertools

import numpy as np
import pytest

from amq.baselines.greedy import greedy_allocation, greedy_allocations
from amq.modeling.discovery import LinearInfo
from amq.search.evaluator import measured
from amq.search.knapsack import knapsack_allocations
from amq.search.pareto import normalized_hypervolume
from amq.search.seeding import additive_damage, budget_levels
from amq.search.space import SearchSpace


def _space(n_blocks: int, seed: int, pruned_top: int = 0, keep_top: int = 2):
    """Linears of mixed shapes (like q/k/gate), lognormal damage; the `pruned_top` worst are pruned."""
    lin = [LinearInfo(f"model.layers.{b}.l{i}", b, f"l{i}", 64, 64 * (1 + i)) for b in range(n_blocks) for i in range(3)]
    rng = np.random.default_rng(seed)
    damage = {li.name: float(d) for li, d in zip(lin, rng.lognormal(-6, 1.5, len(lin)))}
    pruned = sorted(damage, key=damage.get)[len(lin) - pruned_top :] if pruned_top else []
    return SearchSpace(lin, [3, 4, 8], 64, pruned=pruned, keep_top=keep_top), damage


def _brute_force(space: SearchSpace, cost: np.ndarray):
    """Every configuration's (avg bits, summed damage)."""
    choices = [range(int(k)) for k in space.sizes]
    allg = np.array(list(itertools.product(*choices)))
    return allg, space.avg_bits(allg), cost[np.arange(space.n_genes)[None, :], allg].sum(1)


@pytest.mark.parametrize("pruned_top,keep_top", [(0, 2), (2, 2), (2, 1)])
def test_knapsack_matches_brute_force(pruned_top, keep_top):
    space, damage = _space(2, seed=pruned_top + keep_top, pruned_top=pruned_top, keep_top=keep_top)  # 6 linears: at most 729 configs
    cost = additive_damage(space, damage, np.array([1.0, 0.3, 0.01]))
    allg, bits, total = _brute_force(space, cost)
    budgets = np.unique(np.concatenate([bits, bits - 1e-4, budget_levels(15, space.bits_range())]))
    budgets = budgets[budgets >= space.bits_range()[0]]
    dp = knapsack_allocations(space, cost, budgets)
    dp_bits, dp_cost = space.avg_bits(dp), cost[np.arange(space.n_genes)[None, :], dp].sum(1)
    for b, got_bits, got_cost in zip(budgets, dp_bits, dp_cost):
        assert got_bits <= b + 1e-9
        assert got_cost == pytest.approx(total[bits <= b + 1e-9].min(), rel=1e-12, abs=1e-15)


def test_knapsack_coarse_units_stay_within_budget_and_near_optimal():
    space, damage = _space(2, seed=3)
    cost = additive_damage(space, damage)
    allg, bits, total = _brute_force(space, cost)
    budgets = budget_levels(20, space.bits_range())
    dp = knapsack_allocations(space, cost, budgets, max_units=40)  # far coarser than exact
    dp_cost = cost[np.arange(space.n_genes)[None, :], dp].sum(1)
    assert np.all(space.avg_bits(dp) <= np.array(budgets) + 1e-9)
    best = np.array([total[bits <= b + 1e-9].min() for b in budgets])
    assert np.all(dp_cost >= best - 1e-15)
    assert np.mean(dp_cost <= best * 1.5) > 0.5  # rounding costs a little, not everything


def test_greedy_respects_budgets_and_improves_with_them():
    space, damage = _space(10, seed=1, pruned_top=4)
    cost = additive_damage(space, damage)
    lo, hi = space.bits_range()
    budgets = budget_levels(25, (lo, hi), targets=[4.0, 4.5])
    alloc = greedy_allocations(space, cost, budgets)
    abits = space.avg_bits(alloc)
    acost = cost[np.arange(space.n_genes)[None, :], alloc].sum(1)
    assert np.all(abits <= np.array(budgets) + 1e-9)
    assert np.all(alloc < space.sizes[None, :]) and np.all(alloc >= 0)
    order = np.argsort(budgets)
    assert np.all(np.diff(acost[order]) <= 1e-15)  # more bits never predicts more damage
    assert np.all(np.array(budgets) - abits < 0.1)  # it falls back to smaller upgrades, so little of a budget is left
    dp = knapsack_allocations(space, cost, budgets)
    dp_cost = cost[np.arange(space.n_genes)[None, :], dp].sum(1)
    assert np.all(dp_cost <= acost + 1e-15)  # the DP is never worse than greedy


def test_greedy_below_the_space_gives_the_lowest_allocation():
    space, damage = _space(3, seed=0)
    cost = additive_damage(space, damage)
    genes = greedy_allocation(space, cost, space.bits_range()[0] - 0.1)
    assert np.all(genes == 0)
    assert np.all(knapsack_allocations(space, cost, [space.bits_range()[0] - 0.1]) == 0)


def test_true_evaluation_nsga2_spends_at_most_the_budget_inside_the_window():
    from amq.baselines.evolution import true_evaluation_nsga2
    from amq.search.archive import Archive
    from amq.search.loop import SearchSettings
    from amq.search.nsga import NSGA2Settings

    space, damage = _space(10, seed=2, pruned_top=4)
    cost = additive_damage(space, damage)
    calls = []

    def evaluate(genes):  # the additive model stands in for the true metric: cheap and deterministic
        calls.append(space.key(genes))
        return measured(float(cost[np.arange(space.n_genes), genes].sum()), 0.0, "jsd")

    settings = SearchSettings(n_initial_random=10, iterations=5, batch_size=6, nsga=NSGA2Settings(pop_size=10, n_gen=1), bits_window=(3.8, 5.5))
    archive = Archive(space)
    for g in space.random(np.random.default_rng(0), 10, (3.8, 5.5)):
        archive.add(g, evaluate(g), 0, "jsd")
    calls.clear()
    true_evaluation_nsga2(archive, evaluate, settings, "jsd", seed=0)
    new = [r for r in archive.records if r.iteration > 0]
    assert 0 < len(calls) <= settings.iterations * settings.batch_size
    assert len(calls) == len(set(calls)) == len(new)  # nothing evaluated twice, everything archived
    assert all(3.8 - 1e-9 <= r.avg_bits <= 5.5 + 1e-9 for r in new)
    assert max(r.iteration for r in new) <= settings.iterations
    _, y, bits = archive.arrays()
    hv_initial = normalized_hypervolume(y[:10], bits[:10], y.max(), (3.8, 5.5))
    assert normalized_hypervolume(y, bits, y.max(), (3.8, 5.5)) > hv_initial  # the evolution found better trade-offs
