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
