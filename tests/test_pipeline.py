"""The real pipeline, end to end, on the embedded SmolLM2 with the smoke budget (through the CLI)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SMOKE, run_cli_in_process, run_dirs

from amq.io import read_jsonl

pytestmark = pytest.mark.slow

RUN_FILES = ["config.yaml", "sensitivity.json", "archive.jsonl", "front.json", "front.csv", "front.png", "metrics.jsonl", "summary.json", "state.json"]


def _archive(run_dir):
    return [(tuple(r["genes"]), r["metrics"]["jsd"], r["iteration"]) for r in read_jsonl(run_dir / "archive.jsonl")]


def test_run_directory_contract(smoke_run):
    run_dir, _ = smoke_run
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), name
    archive = list(read_jsonl(run_dir / "archive.jsonl"))
    # initial design: 3 uniform + 5 random; then 2 iterations of up to 4
    assert 8 < len(archive) <= 8 + 2 * 4
    keys = [tuple(r["genes"]) for r in archive]
    assert len(keys) == len(set(keys)), "a configuration was evaluated twice"
    rec = archive[0]
    assert rec["config"]["version"] == 1 and len(rec["config"]["bits"]) == 210
    assert rec["avg_bits"] == pytest.approx(rec["avg_bits_weights_only"] + 0.5)  # group 64: +32/64
    metrics = list(read_jsonl(run_dir / "metrics.jsonl"))
    assert [m["iteration"] for m in metrics] == [0, 1, 2]
    assert all(0.0 <= m["hypervolume"] <= 1.21 for m in metrics)
    assert "predictor/fit_seconds" in metrics[1]
    front = json.loads((run_dir / "front.json").read_text())["front"]
    assert front, "empty front"
    bits = np.array([f["avg_bits"] for f in front])
    jsd = np.array([f["jsd"] for f in front])
    assert np.all(np.diff(bits) >= 0) and np.all(np.diff(jsd) <= 0), "front is not monotone"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["true_evaluations"] == len(archive)
    assert (summary["evaluations"]["archived"], summary["evaluations"]["reused_from_cache"], summary["evaluations"]["failed"]) == (len(archive), 0, 0)
    assert summary["protocol"]["bits_convention"].startswith("searchable linears")
    chosen = summary["protocol"]["compute_dtype"]  # model.source.dtype=auto: what it chose, and why
    assert chosen["requested"] == "auto" and chosen["dtype"] == summary["protocol"]["model_dtype"] and chosen["reason"]
    assert (run_dir / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_uniform_configs_order_by_bits(smoke_run):
    """Real quantization damage: 3-bit everywhere hurts more than 4-bit, which hurts more than 8-bit."""
    run_dir, _ = smoke_run
    uniform = {}
    for r in read_jsonl(run_dir / "archive.jsonl"):
        widths = set(r["config"]["bits"].values())
        if r["iteration"] == 0 and len(widths) == 1:
            uniform[widths.pop()] = r["metrics"]["jsd"]
    assert set(uniform) == {4, 8}  # uniform 3-bit is not in the space: pruned linears keep {4, 8}
    assert uniform[4] > uniform[8] > 0
    lowest = [r for r in read_jsonl(run_dir / "archive.jsonl") if r["iteration"] == 0][0]
    assert set(lowest["config"]["bits"].values()) == {3, 4} and lowest["metrics"]["jsd"] > uniform[4]


def test_same_seed_is_deterministic_and_run_returns_what_it_wrote(smoke_run, confirmed_run):
    """The same search run in this process (`run(cfg)`, as tests and scripts call it; conftest's
    CONFIRM, whose confirmation pass adds no archive record) gives the CLI run's archive bit for
    bit, and returns the summary it wrote and the objects it built."""
    run_dir, _ = smoke_run
    again, summary, objects = confirmed_run
    # bit-identical, not close: exact resume and the evaluation cache rely on it
    assert _archive(run_dir) == _archive(again)
    assert json.loads((again / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert objects.run_dir == again and len(objects.archive) == summary["true_evaluations"]
    assert objects.space.n_genes == summary["space"]["genes"] and objects.search.stopped is None
    assert objects.workbench.metric.name == "jsd" and len(objects.table.damage) == summary["model"]["linears"]
    assert summary["model"]["searched_fraction"] == 1.0  # SmolLM2's decoder weights are all nn.Linear


def test_resume_continues_without_duplicates(smoke_run, tmp_path, monkeypatch, capfd):
    """Stop after iteration 1, resume with the full budget: same archive as the uninterrupted run
    (the CLI's entry point in this process; test_time_budget resumes in a new process)."""
    run_dir, _ = smoke_run
    proc = run_cli_in_process([*SMOKE, "seed=3", "budget.iterations=1"], tmp_path, monkeypatch, capfd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (partial,) = run_dirs(tmp_path)
    n_partial = len(_archive(partial))
    proc = run_cli_in_process([*SMOKE, "seed=3", f"resume={partial}"], tmp_path, monkeypatch, capfd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(run_dirs(tmp_path)) == 1, "resume must write into the resumed directory"
    resumed = _archive(partial)
    assert len(resumed) > n_partial
    assert [x[0] for x in resumed] == [x[0] for x in _archive(run_dir)]
    assert [m["iteration"] for m in read_jsonl(partial / "metrics.jsonl")] == [0, 1, 2]


def test_resume_with_a_different_space_is_refused(smoke_run, tmp_path, monkeypatch, capfd):
    run_dir, _ = smoke_run
    before = (run_dir / "archive.jsonl").read_text()
    proc = run_cli_in_process([*SMOKE, "seed=3", "search.pruning.threshold=5.0", f"resume={run_dir}"], tmp_path, monkeypatch, capfd)
    assert proc.returncode == 2
    assert "resume" in proc.stderr and "other settings: search.pruning.threshold=5.0" in proc.stderr
    assert (run_dir / "archive.jsonl").read_text() == before
