"""The speed benchmark end to end on the real SmolLM2 with the smoke budget: every stage is timed
and the end-to-end projection of a preset adds up from them."""

import json

import pytest
from conftest import SMOKE, run_script


@pytest.mark.slow
@pytest.mark.heavy
def test_bench_speed_smoke(tmp_path):
    out = tmp_path / "speed.json"
    proc = run_script(
        "bench_speed.py",
        [*SMOKE, "--repeats", "1", "--sensitivity-linears", "2", "--budgets", "smoke", "--json", str(out)],
        timeout=2400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["forward_floor_s"] > 0 and res["true_eval_eager_ratio"] > 0 and res["proxy_memory_mb"] > 0
    proj = res["projection"]["smoke"]
    assert proj["true_evaluations"] == 3 + 5 + 2 * 4  # uniform configs + initial design + iterations x batch
    parts = [v for k, v in proj.items() if k.endswith("_s") and k != "total_s"]
    assert all(v >= 0 for v in parts) and proj["total_s"] == pytest.approx(sum(parts))
    # the smoke preset's calibration is what this run measured: no scaling
    assert proj["true_evaluations_s"] == pytest.approx(16 * res["true_eval_eager_s"])
