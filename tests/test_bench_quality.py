"""The quality benchmark end to end on the real SmolLM2 with the smoke budget: every method runs,
spends at most the search's true evaluations, and reports bits, JSD and held-out perplexity."""

import json
import math

import pytest
from conftest import SMOKE, load_script, run_script

from amq.bench.token_cost import TokenCost

METHODS = ["amq", "amq, no pruning", "amq, no predictor", "random", "greedy", "knapsack", "uniform"]


@pytest.mark.slow
@pytest.mark.heavy
def test_bench_quality_smoke(tmp_path):
    out = tmp_path / "bench"
    proc = run_script(
        "bench_quality.py",
        [*SMOKE, "budget.iterations=1", "--seeds", "0", "--ppl-window", "128", "--ppl-windows", "2", "--out", str(out)],
        timeout=2400,  # minutes alone; far longer on busy cores
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    methods = res["methods"]
    assert set(methods) == set(METHODS)
    n = methods["amq"]["0"]["true_evaluations"]
    assert n == 3 + 5 + 1 * 4  # smoke: uniform configs + initial design + 1 iteration x batch
    assert methods["random"]["0"]["true_evaluations"] == n
    assert methods["uniform"]["all"]["true_evaluations"] == 3
    for m in ("amq, no predictor", "greedy", "knapsack"):
        key = "all" if m in ("greedy", "knapsack") else "0"
        assert 3 < methods[m][key]["true_evaluations"] <= n
    ppl0 = res["protocol"]["unquantized_perplexity"]  # every held-out text: wiki (the calibration text's domain) and lee
    assert set(ppl0) == {"wiki", "lee"} and all(1 < v < 1e3 for v in ppl0.values())
    for m, rows in methods.items():
        for row in rows.values():
            assert 0 < row["hypervolume"] <= 1.1 * 1.1
            assert row["at_target"], m
            for t, sel in row["at_target"].items():
                assert sel["avg_bits"] <= float(t) + 1e-9
                assert math.isfinite(sel["jsd"]) and sel["jsd"] > 0
                assert sel["perplexity"] == sel["perplexity_by_text"]["wiki"]
                for text, value in sel["perplexity_by_text"].items():
                    assert math.isfinite(value) and value > ppl0[text] * 0.9
    # uniform 4-bit (4.5 bits with scale/zero) is the best uniform config at or under 4.5 and 5.0 bits
    assert methods["uniform"]["all"]["at_target"]["4.5"]["avg_bits"] == pytest.approx(4.5)
    table = (out / "results.md").read_text()
    assert all(f"| {m} |" in table for m in METHODS) and table in proc.stdout
    assert "| PPL @ 4.5 |" in table and "| PPL lee @ 4.5 |" in table
    assert "| calibration tokens (M) |" in table and res["protocol"]["calibration_tokens"]["per_evaluation"] > 0


def test_bench_quality_rejects_unknown_methods(tmp_path):
    """--methods takes the table's names (variants included) and refuses others before loading anything."""
    proc = run_script("bench_quality.py", ["--out", str(tmp_path), "--methods", "amq", "greedyy", "--variant", "amq, slots", "search.target_slots=0.5"])
    assert proc.returncode == 2
    assert "unknown --methods 'greedyy'" in proc.stderr
    assert all(repr(m) in proc.stderr for m in [*METHODS, "amq, slots"])
    assert not any(tmp_path.iterdir())


def test_token_cost_counts_the_sensitivity_table_once_and_only_for_methods_that_use_it():
    """SmolLM2's standard budget: 8 x 256 tokens per evaluation, 210 probes + baseline of 8 x 256."""
    cost = TokenCost(per_evaluation=8 * 256, probes=211, per_probe=8 * 256)
    assert cost.sensitivity == 211 * 2048
    assert cost.of(126, uses_table=True) == (126 + 211) * 2048
    assert cost.of(3, uses_table=False) == 3 * 2048
    assert cost.to_dict() == {"per_evaluation": 2048, "probes": 211, "per_probe": 2048, "estimate": 0, "sensitivity": 211 * 2048}
    estimated = TokenCost(per_evaluation=4 * 512, probes=211, per_probe=512, estimate=4 * 512)  # lean_234: one pass estimates 3 bits
    assert estimated.sensitivity == 211 * 512 + 2048 and estimated.of(126, uses_table=True) == 211 * 512 + 127 * 2048


def test_bench_quality_reports_every_heldout_text_and_redoes_rows_that_lack_one(monkeypatch):
    """A row of an earlier version (the first text only) counts as unfinished, so rerunning on the
    same --out measures the other texts; the table has one perplexity column set per text."""
    bq = load_script("bench_quality.py", monkeypatch)
    texts = ["wiki", "lee"]
    old = {"true_evaluations": 12, "seconds": 3.0, "hypervolume": 0.7, "at_target": {"4": {"avg_bits": 4.0, "jsd": 0.1, "perplexity": 40.0}}}
    new = {**old, "at_target": {"4": {**old["at_target"]["4"], "perplexity_by_text": {"wiki": 40.0, "lee": 55.5}}}}
    assert not bq.complete(None, texts) and not bq.complete(old, texts)
    assert bq.complete(new, texts) and not bq.complete(new, [*texts, "news"])
    table = bq.markdown_table({"amq": {"0": new}, "greedy": {"all": old}}, [4.0], TokenCost(512, 211, 512), texts)
    head, _, amq_row, greedy_row = table.splitlines()
    assert head.endswith("| JSD @ 4 | PPL @ 4 | PPL lee @ 4 |")
    assert amq_row.endswith("| 0.1000 | 40.0 | 55.5 |")
    assert greedy_row.endswith("| 0.1000 | - | - |")  # not measured by this version: no number
    kl_head = bq.markdown_table({"amq": {"0": new}}, [4.0], TokenCost(512, 211, 512), texts, "kl").splitlines()[0]
    assert kl_head.endswith("| KL @ 4 | PPL @ 4 | PPL lee @ 4 |")  # the column is named for the run's metric
