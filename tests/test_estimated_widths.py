"""`search.sensitivity_widths=estimated`: the lowest width probed, the widths between it and the
highest estimated per linear from output errors of one pass (amq.search.output_error). On the real
SmolLM2, smoke budget: the table, its record and its cost; the errors against a direct product."""

import json

import numpy as np
import pytest
import torch
from conftest import SMOKE, search_in_process

from amq.search.output_error import estimate_middle_widths, output_errors
from amq.search.sensitivity import SensitivityTable


def test_the_estimate_scales_the_lowest_damage_by_the_remaining_output_error():
    table = SensitivityTable({"a": 0.4, "b": 0.2, "dead": 0.0, "c": 0.1}, 0.05, 2, 4, "kl", 1.0)
    errors = {
        2: {"a": 10.0, "b": 5.0, "dead": 0.0, "c": 4.0},
        3: {"a": 3.0, "b": 3.5, "dead": 0.0, "c": 5.0},  # c: more error at 3 bits than 2 (clipped to the lowest's damage)
        4: {"a": 1.0, "b": 1.0, "dead": 0.0, "c": 2.0},
    }
    est = estimate_middle_widths(table, errors, tokens=2048)
    assert est.mid[3]["a"] == pytest.approx(0.4 * 2 / 9) and est.mid[3]["b"] == pytest.approx(0.2 * 2.5 / 4)
    assert est.mid[3]["c"] == pytest.approx(0.1)
    assert est.mid[3]["dead"] == 0.0  # no output change: the median ratio of the others, times no damage
    assert est.estimate_tokens == 2048 and est.probes == len(table.damage) + 1  # no probe at 3 bits
    assert SensitivityTable.from_dict(est.to_dict()) == est
    with pytest.raises(ValueError, match="no linear's output changed at 2 bits"):
        estimate_middle_widths(table, {w: dict.fromkeys(table.damage, 0.0) for w in (2, 3, 4)}, tokens=1)


@pytest.mark.slow
def test_estimated_middle_widths_seed_the_search_from_one_pass(tmp_path):
    run = tmp_path / "run"
    summary, objects = search_in_process([*SMOKE, "budget.iterations=0", "search.sensitivity_widths=estimated"], run)
    table, wb = objects.table, objects.workbench
    low, middle, high = wb.bits  # SmolLM2's {3, 4, 8}
    assert set(table.mid) == {middle} and set(table.mid[middle]) == set(table.damage)
    assert table.estimate_tokens == wb.tokens.numel() and table.probes == len(table.damage) + 1
    lowest, mid = np.array(list(table.damage.values())), np.array([table.mid[middle][n] for n in table.damage])
    # between no damage and the lowest width's (whose probe can measure a little below the baseline: noise)
    assert np.all(mid >= np.minimum(lowest, 0)) and np.all(mid <= np.maximum(lowest, 0)) and mid.sum() < lowest.sum()
    sens = json.loads((run / "sensitivity.json").read_text())
    assert sens["mid"][str(middle)] == table.mid[middle] and sens["estimate_tokens"] == table.estimate_tokens
    assert summary["final_hypervolume"] > 0

    # the hooked pass's error of one linear is ||X (W_b - W)^T||^2 over the windows' inputs to it
    name = "model.layers.3.mlp.down_proj"
    errors = output_errors(wb.bank, wb.tokens, [[name]], wb.bits)
    seen: list[torch.Tensor] = []
    handle = wb.bank.modules[name].register_forward_hook(lambda m, i, o: seen.append(i[0].detach().reshape(-1, i[0].shape[-1]).float()))
    with torch.no_grad():
        for row in wb.tokens:
            wb.bank.model(row[None])
    handle.remove()
    x = torch.cat(seen)
    for w in (low, middle, high):
        delta = wb.bank.weight(name, w).float() - wb.bank.weight(name, None).float()
        assert errors[w][name] == pytest.approx(float(((x @ delta.T) ** 2).sum()), rel=1e-4)
    assert errors[low][name] > errors[middle][name] > errors[high][name] > 0
