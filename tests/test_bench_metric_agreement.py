"""scripts/bench_metric_agreement.py: held-out perplexity against summaries of the calibration
divergence, on a finished smoke search's near-ties (real SmolLM2)."""

import json

import pytest
from conftest import SMOKE, run_script


@pytest.mark.slow
@pytest.mark.heavy
def test_agreement_recomputes_the_runs_own_metric_and_ranks_each_summary(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    out = tmp_path / "agreement"
    args = [*SMOKE, "--runs", str(run_dir), "--targets", "4.25", "4.5", "--top", "3", "--trims", "0.05", "--ppl-window", "128", "--ppl-windows", "2"]
    proc = run_script("bench_metric_agreement.py", [*args, "--out", str(out)], timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    archive = {json.dumps(r["config"]["bits"], sort_keys=True): r for r in map(json.loads, (run_dir / "archive.jsonl").read_text().splitlines())}
    assert len(res["rows"]) == 6
    for row in res["rows"]:
        cal = row["calibration"]
        assert 0 < cal["KL, top 5% left out"] < cal["KL"]
        assert set(row["perplexity"]) == {"wiki", "lee"}
    # the smoke search's metric is JSD on the same calibration windows: the script measures it again
    rec = max(archive.values(), key=lambda r: -r["metrics"]["jsd"] if r["avg_bits"] <= 4.25 else -1e9)
    first = next(r for r in res["rows"] if r["target"] == 4.25 and r["rank"] == 0)
    assert first["calibration"]["JSD"] == pytest.approx(rec["metrics"]["jsd"], rel=1e-3)
    assert set(res["spearman"]) == {"4.25", "4.5"} and "| 4.5 | 3 | lee |" in (out / "results.md").read_text()


def test_agreement_refuses_a_folder_that_is_not_a_run(tmp_path):
    proc = run_script("bench_metric_agreement.py", ["--runs", str(tmp_path), "--out", str(tmp_path / "out")])
    assert proc.returncode == 2
    assert f"--runs {tmp_path}: no archive.jsonl there" in proc.stderr
    assert not (tmp_path / "out").exists()
