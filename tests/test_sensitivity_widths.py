"""`search.sensitivity_widths=all` on the real SmolLM2: every linear is probed at each width below
the highest, the table keeps those damages and each probe's standard error, and the initial
design's seeds are the allocations of the measured model (no width factors), so a search starts
from them. With `search.shrink_table=true` the middle width's damages are the shrunk ones, and the
probed ones stay on record."""

import json

import numpy as np
import pytest
from conftest import SMOKE, search_in_process

from amq.search.knapsack import knapsack_allocations
from amq.search.loop import search_bits_range
from amq.search.seeding import additive_damage, budget_levels, width_factors


@pytest.mark.slow
def test_every_width_is_probed_and_seeds_the_search(tmp_path):
    run = tmp_path / "run"
    summary, objects = search_in_process([*SMOKE, "budget.iterations=0", "search.sensitivity_widths=all", "search.shrink_table=true"], run)
    table, space, archive = objects.table, objects.space, objects.archive
    bits = objects.workbench.bits
    assert len(bits) == 3  # SmolLM2's {3, 4, 8}: one middle width
    middle = bits[1]
    assert set(table.mid) == {middle} and set(table.mid[middle]) == set(table.damage)
    assert table.probes == 2 * (len(table.damage) + 1)
    low, mid = np.array(list(table.damage.values())), np.array([table.mid[middle][n] for n in table.damage])
    assert np.all(np.isfinite(mid)) and mid.mean() < low.mean()  # a wider grid hurts less, on average
    # every probe has a standard error; the shrunk damages moved (some), within the probed range
    assert set(table.stderr) == set(bits[:-1]) and all(set(v) == set(table.damage) for v in table.stderr.values())
    assert all(np.isfinite(e) and e > 0 for v in table.stderr.values() for e in v.values())
    probed = np.array([table.mid_measured[middle][n] for n in table.damage])
    assert not np.allclose(mid, probed) and mid.min() >= min(probed.min(), 0.0) and mid.max() <= max(probed.max(), low.max())
    # the run's record holds the middle widths, as shrunk and as probed, and the standard errors
    sens = json.loads((run / "sensitivity.json").read_text())
    assert sens["mid"][str(middle)] == table.mid[middle] and sens["mid_measured"][str(middle)] == table.mid_measured[middle]
    assert sens["stderr"][str(bits[0])] == table.stderr[bits[0]]
    # the knapsack seeds of the initial design are the measured model's allocations
    uniform = {b: r.metric for b in bits for r in archive.records if r.iteration == 0 and space.key(r.genes) == space.key(space.uniform(b))}
    factors = width_factors(space, uniform, table.damage)
    levels = budget_levels(objects.plan.sensitivity_seeds, search_bits_range(space, objects.plan.settings), objects.workbench.targets)
    expected = knapsack_allocations(space, additive_damage(space, table.damage, factors, table.mid), levels)
    initial = {space.key(r.genes) for r in archive.records if r.iteration == 0}
    assert all(space.key(g) in initial for g in expected)
    assert summary["final_hypervolume"] > 0
