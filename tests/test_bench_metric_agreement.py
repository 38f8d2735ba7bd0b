"""scripts/bench_metric_agreement.py: held-out perplexity against summaries of the calibration
divergence, on a finished smoke search's near-ties (real SmolLM2)."""

import json

import pytest
from conftest import SMOKE, load_script, main_in_process, run_script


@pytest.mark.slow
@pytest.mark.heavy
def test_agreement_recomputes_the_runs_own_metric_and_ranks_each_summary(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    out = tmp_path / "agreement"
    args = [*SMOKE, "--runs", str(run_dir), "--targets", "4.25", "4.5", "--top", "3", "--trims", "0.05", "--ppl-window", "128", "--ppl-windows", "2"]
    proc = run_script("bench_metric_agreement.py", [*args, "--out", str(out)], timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    archive = [json.loads(line) for line in (run_dir / "archive.jsonl").read_text().splitlines()]
    assert len(res["rows"]) == 6
    for row in res["rows"]:
        cal = row["calibration"]
        assert 0 < cal["KL, top 5% left out"] < cal["KL"]
        assert set(row["perplexity"]) == {"wiki", "lee"}
    # the smoke search's metric is JSD on the same calibration windows: the script measures it again
    rec = min((r for r in archive if r["avg_bits"] <= 4.25 + 1e-9), key=lambda r: r["metrics"]["jsd"])
    first = next(r for r in res["rows"] if r["target"] == 4.25 and r["rank"] == 0)
    assert first["calibration"]["JSD"] == pytest.approx(rec["metrics"]["jsd"], rel=1e-3)
    assert set(res["spearman"]) == {"4.25", "4.5"} and "| 4.5 | 3 | lee |" in (out / "results.md").read_text()


def test_agreement_refuses_bad_arguments_before_loading_anything(tmp_path, monkeypatch, capfd):
    main = load_script("bench_metric_agreement.py", monkeypatch).main
    run = tmp_path / "run"
    run.mkdir()
    (run / "archive.jsonl").write_text('{"avg_bits": 4.0, "metrics": {"jsd": 0.1}, "config": {"bits": {}}}\n')
    cases = {
        "--runs {tmp}: no archive.jsonl there": ["--runs", str(tmp_path)],
        "--top 2: a rank correlation needs at least 3": ["--runs", str(run), "--top", "2"],
        "--trims 0.5: each a fraction in [0, 0.5)": ["--runs", str(run), "--trims", "0.01", "0.5"],
        "--targets 3: no configuration of the runs is at or under it": ["--runs", str(run), "--targets", "3.0", "4.0"],
    }
    for message, args in cases.items():
        monkeypatch.setattr("sys.argv", ["bench_metric_agreement.py", *args, "--out", str(tmp_path / "out")])
        proc = main_in_process("bench_metric_agreement.py", main, None, capfd)
        assert proc.returncode == 2 and message.format(tmp=tmp_path) in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()
