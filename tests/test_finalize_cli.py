"""`amq-finalize`: the finalize stage again on a finished run, with other budgets or quantizer.

Works on a copy of the session's smoke search (finished, no finalize stage of its own).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import run_module
from omegaconf import OmegaConf
from test_finalize import check_plain_transformers_reproduces


def _finalize_cli(args: list[str]) -> subprocess.CompletedProcess:
    return run_module("cli.finalize", args)


def _files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and "finalized" not in p.parts}


@pytest.fixture
def run_copy(smoke_run, tmp_path) -> Path:
    run_dir, _ = smoke_run
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


@pytest.mark.slow
# GPTQ's export takes the same path as HQQ's (fractional zeros, naive-quantized; test_finalize) and
# the min-max grid's (test_compressed_tensors), so its end-to-end run is in `make test-all` only
# AWQ's searches are shrunk to 4 scale candidates and no clipping search: the folding, not the search, is checked
@pytest.mark.parametrize(
    "finalizer, shrink",
    [pytest.param("gptq", [], marks=pytest.mark.heavy), ("awq", ["finalizer.n_grid=4", "finalizer.clip=false"])],
    ids=["gptq", "awq"],
)
def test_finalizes_a_finished_run_into_its_own_directory(run_copy, tmp_path, finalizer, shrink):
    """GPTQ or AWQ, later, from the archive: a new directory, and a checkpoint plain transformers
    reproduces (AWQ's input scales folded into the norms and up_proj)."""
    before = _files(run_copy)
    proc = _finalize_cli(
        [
            str(run_copy),
            f"finalizer={finalizer}",
            "finalize.targets=[4.25]",
            "finalize.baselines=false",
            "finalize.extra_front_points=0",
            "finalize.window=256",
            "finalize.max_windows=1",
            "num_threads=2",
            *shrink,
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out,) = list((run_copy / "finalized").iterdir())
    assert _files(run_copy) == before  # the search's own files are untouched
    report = json.loads((out / "evaluation.json").read_text())
    (row,) = report["rows"]
    assert row["kind"] == "target" and row["target"] == 4.25 and row["avg_bits"] <= 4.25
    model = out / "models" / "4.25"
    for name in ("amq_packed.safetensors", "compressed-tensors/model.safetensors", "bit_config.json", "amq_quant.json", "eval.json", "README.md"):
        assert (model / name).is_file(), name
    assert OmegaConf.load(out / "config.yaml").finalize.targets == [4.25]
    assert str(out) in proc.stderr
    check_plain_transformers_reproduces(out, ["4.25"], tmp_path)


@pytest.mark.parametrize(
    "args,setting",
    [
        (["seed=5"], "overrides"),
        (["finalizer=int3"], "overrides"),
        (["+finalize.tragets=[4.0]"], "finalize.tragets"),
        (["finalize.targets=[2.0]"], "finalize.targets"),
    ],
)
def test_bad_requests_are_refused_and_leave_nothing(run_copy, args, setting):
    proc = _finalize_cli([str(run_copy), *args])
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1 and errors[0].split("] - ", 1)[1].startswith(f"{setting}:"), proc.stderr[-2000:]
    assert "(valid: " in errors[0] and "Traceback" not in proc.stderr
    assert not (run_copy / "finalized").exists()


def test_an_unfinished_run_is_refused(run_copy):
    (run_copy / "summary.json").unlink()
    proc = _finalize_cli([str(run_copy)])
    assert proc.returncode == 2 and "has not finished its search" in proc.stderr and "resume=" in proc.stderr
    assert not (run_copy / "finalized").exists()
