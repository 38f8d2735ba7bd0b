"""Bad input: one clear line naming the setting and what is valid, non-zero exit, no traceback,
and no run directory left behind."""

from __future__ import annotations

import pytest

from conftest import SMOKE, run_cli, run_dirs

CASES = {
    "unknown model dir": (["model=hf", "model.source.name_or_path=/nonexistent/model"], "model.name_or_path"),
    "bits HQQ can't pack": (["search.bits=[3,7]"], "search.bits"),
    "group size not dividing": (["model.group_size=100"], "quantizer.group_size"),
    "budget with no work": (["budget.iterations=0", "budget.n_initial_random=0"], "budget"),
    "target out of range": (["search.targets=[12.0]"], "search.targets"),
    "single bit width": (["search.bits=[4]"], "search.bits"),
    "bad predictor target": (["predictor.target=sqrt"], "predictor.target"),
    "unknown predictor key": (["+predictor.nonsense=1"], "predictor"),
    "resume without state": (["resume=/tmp"], "resume"),
    "bad metric": (["metric.kind=mse"], "metric.kind"),
    "hub dataset offline": (["data=wikitext2"], "data"),
    "hub model offline": (["model=hf", "model.source.name_or_path=HuggingFaceTB/SmolLM2-135M"], "model.name_or_path"),
    "bad logger mode": (["logger=wandb", "logger.mode=sometimes"], "logger.mode"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clear_line(name, tmp_path):
    overrides, setting = CASES[name]
    proc = run_cli([*SMOKE, *overrides], tmp_path, timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    errors = [line for line in proc.stderr.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert setting in errors[0]
    assert "Traceback" not in proc.stderr
    assert run_dirs(tmp_path) == [], "a failed run left a directory behind"


def test_unknown_config_option_is_refused(tmp_path):
    proc = run_cli([*SMOKE, "model=llama9000"], tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "llama9000" in proc.stderr and "Available options" in proc.stderr
    assert "Traceback" not in proc.stderr
