"""The 7B-scale speed benchmark, end to end on a tiny random Llama (CPU), and its cost model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_script

from amq.bench.cost_model import MeasuredCurve, SearchWork, StageCosts, project

TINY = [
    "budget.seq_len=32",
    "budget.n_initial_random=10",
    "budget.iterations=3",
    "budget.batch_size=4",
    "budget.pop_size=8",
    "budget.n_gen=2",
    "num_threads=2",
    "metric.compile=false",
]


def _run_bench(tmp_path, device: str) -> dict:
    out = tmp_path / "gpu.json"
    proc = run_script(
        "bench_gpu.py",
        [
            *TINY,
            "--arch",
            "tiny",
            "--device",
            device,
            "--samples",
            "4",
            "2",
            "--fit-sizes",
            "20",
            "40",
            "--predictors",
            "backend=scipy",
            "backend=torch",
            "--baseline-divergence",
            "amq/metrics/divergence.py",
            "--json",
            str(out),
        ],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "projected 25-evaluation search at 4x32, predictor backend=torch" in proc.stdout
    return json.loads(out.read_text())


def _check(res: dict) -> None:
    assert res["n_linears"] == 14 and res["bits"] == [2, 3, 4] and res["group_size"] == 128
    assert res["proxy"]["storage"] == "packed" and 0.2 < res["proxy"]["bank_over_model"] < 1.0
    assert res["work"] == {"true_evaluations": 3 + 10 + 3 * 4, "iterations": 3, "sensitivity_evaluations": 15}
    for cal, n in zip(res["calibration"], (4, 2)):
        assert cal["n_samples"] == n and cal["forward_floor_s"] > 0
        values = {name: v["value_of_first_config"] for name, v in cal["variants"].items()}
        assert set(values) == {"baseline:64", "probs:64", "hidden:1024"}
        assert all(v > 0 for v in values.values())
        # three implementations of one metric agree
        assert max(values.values()) - min(values.values()) < 1e-4 * max(values.values())
        assert cal["variants"]["hidden:1024"]["reference_bytes"] < cal["variants"]["probs:64"]["reference_bytes"]
        by_predictor = res["projection"][f"{n}x32"]
        assert set(by_predictor) == {"backend=scipy", "backend=torch"}  # the RBF's two backends, side by side
        for proj in by_predictor.values():
            assert proj["total_s"] == pytest.approx(sum(v for k, v in proj.items() if k != "total_s"))
            assert proj["true_evaluations_s"] == pytest.approx(25 * cal["variants"]["hidden:1024"]["true_eval_s"])
    for v in res["search_step"]["variants"].values():
        assert [s["n_points"] for s in v["by_archive_size"]] == [20, 40] and all(s["fit_s"] > 0 and s["nsga_s"] > 0 for s in v["by_archive_size"])


@pytest.mark.heavy  # make test-all: a benchmark script's smoke run (the cost model's tests below stay in make test)
def test_bench_gpu_runs_end_to_end_on_cpu(tmp_path):
    _check(_run_bench(tmp_path, "cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bench_gpu_runs_end_to_end_on_cuda(tmp_path):
    res = _run_bench(tmp_path, "cuda")
    _check(res)
    assert res["proxy"]["device_bytes_added"] > 0 and res["peak_device_bytes"] > 0


def test_measured_curve_follows_power_laws_between_measurements():
    cubic = MeasuredCurve.measured([10_000, 100, 1000], [2e-9 * n**3 for n in (10_000, 100, 1000)])
    assert cubic(5000) == pytest.approx(2e-9 * 5000**3) and cubic(300) == pytest.approx(2e-9 * 300**3)
    assert cubic(50) == pytest.approx(2e-9 * 100**3) and cubic(20_000) == pytest.approx(2e-9 * 10_000**3)
    assert MeasuredCurve.measured([50], [0.3])(10_000) == pytest.approx(0.3)


def test_projection_counts_the_paper_budget():
    work = SearchWork(n_uniform=3, n_initial_random=247, iterations=200, batch_size=50, n_linears=224)
    assert work.true_evaluations == 10_250
    sizes = work.archive_sizes()
    assert sizes[0] == 250 and sizes[-1] == 250 + 199 * 50 and len(sizes) == 200
    costs = StageCosts(10.0, 2.0, 1.0, 0.5, MeasuredCurve.measured([1], [0.01]), MeasuredCurve.measured([1], [0.1]))
    proj = project(work, costs)
    assert proj["true_evaluations_s"] == 10_250 and proj["sensitivity_s"] == 225 * 0.5
    assert proj["predictor_fit_s"] == pytest.approx(2.0) and proj["nsga_s"] == pytest.approx(20.0)
    assert proj["total_s"] == pytest.approx(10 + 2 + 112.5 + 10_250 + 2 + 20)
