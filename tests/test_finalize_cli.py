"""`amq-finalize`: the finalize stage again on a finished run, with other budgets or quantizer.

Works on a copy of the session's smoke search (finished, no finalize stage of its own), and AWQ on
the finalized search the session shares (conftest `awq_finalized`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import Finalized, main_in_process, run_module, tree_digest
from omegaconf import OmegaConf
from test_finalize import check_plain_transformers_reproduces


def _refused(args: list[str], capfd) -> subprocess.CompletedProcess:
    """`amq-finalize` in this process, for requests it refuses before any work."""
    from amq.cli.finalize import main

    return main_in_process("amq-finalize", main, args, capfd)


@pytest.fixture
def run_copy(smoke_run, tmp_path) -> Path:
    run_dir, _ = smoke_run
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def check_finalized(plain_python, done: Finalized, target: str, tmp_path: Path) -> None:
    """A new directory under the run's finalized/, the run's own files untouched, the model files of
    one budget, and a checkpoint plain transformers reproduces."""
    assert tree_digest(done.run) == done.before  # the search's own files are untouched
    report = json.loads((done.out / "evaluation.json").read_text())
    (row,) = report["rows"]
    assert row["kind"] == "target" and f"{row['target']:g}" == target and row["avg_bits"] <= row["target"]
    model = done.out / "models" / target
    for name in ("amq_packed.safetensors", "compressed-tensors/model.safetensors", "bit_config.json", "amq_quant.json", "eval.json", "README.md"):
        assert (model / name).is_file(), name
    assert [f"{t:g}" for t in OmegaConf.load(done.out / "config.yaml").finalize.targets] == [target]
    assert str(done.out) in done.proc.stderr
    check_plain_transformers_reproduces(plain_python, done.out, [target], tmp_path)


@pytest.mark.slow
def test_awq_finalizes_a_finished_run_into_its_own_directory(awq_finalized, plain_python, tmp_path):
    """AWQ, later, from the archive (the session's shared search, conftest), its input scales folded
    into the norms and up_proj of the checkpoint; the amq directory holds that same folded model."""
    check_finalized(plain_python, awq_finalized, "4.25", tmp_path)
    modules = json.loads((awq_finalized.out / "models" / "4.25" / "amq_quant.json").read_text())["modules"]
    assert not [n for n, m in modules.items() if m["has_input_scale"]]  # SmolLM2: every scale folds


@pytest.mark.slow
@pytest.mark.heavy  # GPTQ's export takes the same path as HQQ's (fractional zeros; test_finalize) and the min-max grid's (test_compressed_tensors)
def test_gptq_finalizes_a_finished_run_into_its_own_directory(run_copy, plain_python, tmp_path):
    before = tree_digest(run_copy)
    args = ["finalizer=gptq", "finalize.targets=[4.25]", "finalize.baselines=false", "finalize.extra_front_points=0", "finalize.window=256"]
    proc = run_module("cli.finalize", [str(run_copy), *args, "finalize.max_windows=1", "num_threads=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out,) = list((run_copy / "finalized").iterdir())
    check_finalized(plain_python, Finalized(run_copy, out, proc, before), "4.25", tmp_path)


@pytest.mark.slow
def test_a_configuration_selected_twice_is_evaluated_once(run_copy, capfd):
    """Targets 8.5 and 9.0 both select uniform 8-bit (8.5 bits with scale and zero at group 64, the
    largest configuration), which is also the uniform baseline of both: one evaluation, its numbers
    in both models' eval.json and the baseline's row, each reuse said in the log and the file."""
    from amq.cli.finalize import main

    args = ["finalize.targets=[8.5,9.0]", "finalize.extra_front_points=0", "finalize.window=128", "finalize.max_windows=1", "num_threads=2"]
    proc = main_in_process("amq-finalize", main, [str(run_copy), *args], capfd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out,) = (run_copy / "finalized").iterdir()
    first, second = (json.loads((out / "models" / t / "eval.json").read_text()) for t in ("8.5", "9"))
    assert json.loads((out / "models" / "9" / "bit_config.json").read_text()) == json.loads((out / "models" / "8.5" / "bit_config.json").read_text())
    assert second["perplexity"] == first["perplexity"] and second["same_as"] == "8.5 bits" and "same_as" not in first
    rows = {(r["kind"], r.get("target")): r for r in json.loads((out / "evaluation.json").read_text())["rows"]}
    assert rows[("uniform", None)]["perplexity"] == rows[("target", 8.5)]["perplexity"] == rows[("target", 9.0)]["perplexity"]
    assert rows[("unquantized", None)]["perplexity"] != rows[("target", 8.5)]["perplexity"]
    reused = [line for line in proc.stderr.splitlines() if "whose evaluation is reused" in line]
    assert len(reused) == 2 and "9 bits: the configuration of 8.5 bits" in reused[0] and "uniform 8-bit" in reused[1], proc.stderr[-3000:]


@pytest.mark.parametrize(
    "args,setting",
    [
        (["seed=5"], "overrides"),
        (["finalizer=int3"], "overrides"),
        (["+finalize.tragets=[4.0]"], "finalize.tragets"),
        (["finalize.targets=[2.0]"], "finalize.targets"),
    ],
)
def test_bad_requests_are_refused_and_leave_nothing(run_copy, args, setting, capfd):
    proc = _refused([str(run_copy), *args], capfd)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1 and errors[0].split("] - ", 1)[1].startswith(f"{setting}:"), proc.stderr[-2000:]
    assert "(valid: " in errors[0] and "Traceback" not in proc.stderr
    assert not (run_copy / "finalized").exists()


def test_an_unfinished_run_is_refused(run_copy, capfd):
    (run_copy / "summary.json").unlink()
    proc = _refused([str(run_copy)], capfd)
    assert proc.returncode == 2 and "has not finished its search" in proc.stderr and "resume=" in proc.stderr
    assert not (run_copy / "finalized").exists()
