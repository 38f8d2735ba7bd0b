"""Warm-start allocations from the sensitivity table: valid, spread over the window, and better
than random configurations under the additive damage model they assume."""

import numpy as np

from amq.modeling.discovery import LinearInfo
from amq.search.seeding import allocation_family, sensitivity_seeds
from amq.search.space import SearchSpace


def _space(keep_top: int = 2):
    lin = [LinearInfo(f"model.layers.{b}.l{i}", b, f"l{i}", 64, 64 * (1 + i % 3)) for b in range(10) for i in range(7)]
    rng = np.random.default_rng(0)
    damage = {li.name: float(d) for li, d in zip(lin, rng.lognormal(-7, 1.5, len(lin)))}
    pruned = sorted(damage, key=damage.get)[-8:]
    return SearchSpace(lin, [3, 4, 8], 64, pruned=pruned, keep_top=keep_top), damage


def _additive(space, damage, genes):
    gb = space.gene_bits(genes)
    d = np.array([sum(damage[n] for n in g) for g in space.groups])
    return (d[None, :] * np.power(4.0, -(gb - 3))).sum(1)


def test_family_spans_the_range_in_order():
    space, damage = _space()
    fam = allocation_family(space, damage)
    bits = space.avg_bits(fam)
    assert np.all(np.diff(bits) >= 0)
    lo, hi = space.bits_range()
    assert bits[0] == lo and bits[-1] == hi
    assert np.all(fam < space.sizes[None, :])


def test_seeds_inside_range_and_beat_random_under_the_model():
    space, damage = _space()
    seeds = sensitivity_seeds(space, damage, 5, (4.0, 5.5))
    bits = space.avg_bits(seeds)
    assert 1 <= len(seeds) <= 5 and np.all((bits >= 3.5) & (bits <= 5.5))
    rand = space.random(np.random.default_rng(1), 500, (3.6, 5.5))
    rbits, rdmg = space.avg_bits(rand), _additive(space, damage, rand)
    for s, b, d in zip(seeds, bits, _additive(space, damage, seeds)):
        under = rdmg[rbits <= b]
        assert len(under) == 0 or d <= under.min()


def test_no_seeds_requested():
    space, damage = _space()
    assert sensitivity_seeds(space, damage, 0, (4.0, 5.0)).shape == (0, space.n_genes)


def test_batch_selection_serves_targets_and_spreads():
    from amq.search.selection import select_batch

    rng = np.random.default_rng(0)
    X = rng.integers(0, 3, size=(300, 20))
    bits = np.linspace(3.5, 5.5, 300)
    predicted = 1.0 / bits + rng.random(300) * 0.01
    key = lambda g: "".join(map(str, g))  # noqa: E731
    seen = {key(X[0])}
    batch = select_batch(X, predicted, bits, seen, key, 6, (3.5, 5.5), targets=[4.0, 4.5])
    idx = [int(np.flatnonzero((X == b).all(1))[0]) for b in batch]
    chosen_bits = bits[idx]
    assert len(batch) == 6 and 0 not in idx and len(set(idx)) == 6
    assert any(4.0 - 2 / 6 <= b <= 4.0 for b in chosen_bits) and any(4.5 - 2 / 6 <= b <= 4.5 for b in chosen_bits)
    assert chosen_bits.max() - chosen_bits.min() > 1.0  # spread along the bits axis, not clustered


def test_knapsack_seeds_spend_each_target_at_least_as_well_as_the_lagrangian_ones():
    space, damage = _space()
    targets = [4.0, 4.5, 5.0]
    lag = sensitivity_seeds(space, damage, 5, (3.8, 5.5), targets)
    dp = sensitivity_seeds(space, damage, 5, (3.8, 5.5), targets, allocator="knapsack")
    assert len(dp) == len({space.key(g) for g in dp}) and 3 <= len(dp) <= 5
    for t, a, b in zip(targets, lag, dp):  # the first seeds serve the targets, in order
        assert space.avg_bits(b) <= t + 1e-9 and space.avg_bits(a) <= t + 1e-9
        assert _additive(space, damage, b[None])[0] <= _additive(space, damage, a[None])[0] + 1e-15


def test_unknown_seed_allocator_is_a_config_error():
    import pytest

    from amq.errors import ConfigError

    space, damage = _space()
    with pytest.raises(ConfigError, match="^allocator: "):
        sensitivity_seeds(space, damage, 3, (3.8, 5.5), allocator="simplex")


def test_width_factors_see_through_pruned_uniform_configs():
    """In a pruned space uniform-3 keeps the most sensitive linears at 4 bits; the factors must still be the true ones."""
    from amq.search.seeding import width_factors

    space, damage = _space(keep_top=2)
    true = np.array([1.0, 0.15, 0.002])

    def metric(sp: SearchSpace, bits: int) -> float:  # the additive model, at an arbitrary scale
        return 3.0 * sum(damage[n] * true[[3, 4, 8].index(w)] for n, w in sp.to_bits(sp.uniform(bits)).items())

    uniform = {b: metric(space, b) for b in (3, 4, 8)}
    assert np.allclose(width_factors(space, uniform, damage), true)
    assert not np.allclose(width_factors(space, uniform), true)  # plain ratios are biased by the pruned linears
    full = SearchSpace(space.linears, [3, 4, 8], 64)
    plain = {b: metric(full, b) for b in (3, 4, 8)}
    assert np.allclose(width_factors(full, plain, damage), true)
    assert np.allclose(width_factors(full, plain), true)  # no pruning: the plain ratios are already right


def test_random_draws_nothing_when_asked_for_nothing():
    space, _ = _space()
    for window in (None, (4.0, 5.0)):
        assert space.random(np.random.default_rng(0), 0, window).shape == (0, space.n_genes)


def test_measured_middle_widths_replace_the_width_factors():
    """With damage probed at 4 bits too (search.sensitivity_widths=all), each width costs what it
    measured over the all-8-bit configuration (8 bits cost 0), not the 3-bit damage times a factor
    per width; the knapsack then keeps off 4 bits a linear whose 4-bit probe hurts."""
    from amq.search.knapsack import knapsack_allocations
    from amq.search.seeding import additive_damage

    space, damage = _space(keep_top=3)  # every gene keeps {3, 4, 8}
    names = [g[0] for g in space.groups]
    at4 = {n: damage[n] / 4 for n in names}
    odd = sorted(names, key=damage.get)[len(names) // 2]  # a middling linear at 3 bits...
    at4[odd] = 2 * damage[odd]  # ...that 4 bits hurt more than 3 (a measured fact no factor model can hold)
    cost = additive_damage(space, damage, None, {4: at4})
    i = names.index(odd)
    assert cost[i].tolist() == [damage[odd], at4[odd], 0.0]
    assert np.all(cost[:, 2] == 0.0) and np.allclose(cost[:, 0], [damage[n] for n in names])
    plain = additive_damage(space, damage)  # factors 4^-(b - 3): 4 bits at a quarter of 3 bits
    assert plain[i, 1] == damage[odd] / 4
    budgets = [float(space.avg_bits(space.uniform(b))) for b in (3, 4)] + [4.2, 4.6]
    for with_probe, without in zip(knapsack_allocations(space, cost, budgets), knapsack_allocations(space, plain, budgets)):
        assert space.gene_bits(with_probe[None])[0, i] != 4  # 3 bits is both cheaper and less damaging
        total = cost[np.arange(space.n_genes), with_probe].sum()
        assert total <= cost[np.arange(space.n_genes), without].sum() + 1e-12  # optimal under what was measured
