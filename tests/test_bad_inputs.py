"""The catalogue of bad inputs: each one is refused with one clear line naming the setting and what
would be valid, a non-zero exit, no traceback, and nothing half-written (no run directory left
behind, a resumed directory untouched). The README's troubleshooting table is checked against it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from conftest import ROOT, SMOKE, run_cli_in_process, run_dirs, settings_yaml


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def empty_calibration_text(tmp: Path, compose) -> None:
    _write(tmp / "calib.txt", "\n   \n\n")
    _write(tmp / "held.txt", "Some held-out text.\n")


def output_dir_is_a_file(tmp: Path, compose) -> None:
    _write(tmp / "file", "not a directory\n")


def run_with(overrides: list[str], state: str | None = None) -> Callable[[Path, Callable], None]:
    """A run directory `tmp/run` whose config.yaml holds these settings (and a state.json text)."""

    def setup(tmp: Path, compose) -> None:
        cfg = compose([*SMOKE, *overrides])
        _write(tmp / "run" / "config.yaml", settings_yaml(cfg))
        if state is not None:
            _write(tmp / "run" / "state.json", state)

    return setup


@dataclass(frozen=True)
class Case:
    overrides: list[str]
    setting: str  # what the one error line begins with
    env: dict[str, str] = field(default_factory=dict)
    setup: Callable[[Path, Callable], None] | None = None
    by_hydra: bool = False  # refused by Hydra while composing: exit 1 and Hydra's own message


CASES = {
    "unknown config option": Case(["model=llama9000"], "model", by_hydra=True),
    "misspelled key": Case(["budget.iteratons=3"], "budget.iteratons", by_hydra=True),
    "misspelled key added with +": Case(["+budget.iteratons=3"], "budget.iteratons"),
    "misspelled component parameter": Case(["+search.pruning.treshold=3"], "search.pruning.treshold"),
    "wrong type": Case(["budget.iterations=many"], "budget.iterations"),
    "wrong type in a list": Case(["search.bits=[3,four]"], "search.bits"),
    "bits HQQ can't pack": Case(["search.bits=[3,7]"], "search.bits"),
    "a single bit width": Case(["search.bits=[4]"], "search.bits"),
    "a width the fast runtime cannot serve": Case(["search.serve_with=fast", "search.bits=[3,4,6]"], "search.bits"),
    "unknown serving runtime": Case(["search.serve_with=tpu"], "search.serve_with"),
    "a width vLLM cannot serve": Case(["search.serve_with=vllm", "search.bits=[3,4,8]"], "search.bits"),
    "vLLM with siblings free to differ": Case(["search.serve_with=vllm", "search.bits=[4,8]", "search.targets=[5.0]"], "search.share_groups"),
    "vLLM with fractional zero points": Case(
        ["search.serve_with=vllm", "search=amq_fused", "search.bits=[4,8]", "search.targets=[5.0]"], "finalizer.integer_zero"
    ),
    "group size not dividing a layer": Case(["quantizer.group_size=100"], "quantizer.group_size"),
    "target bits out of reach": Case(["search.targets=[12.0]"], "search.targets"),
    "no targets": Case(["search.targets=[]", "finalize.enabled=true"], "search.targets"),
    "windows longer than the model's context": Case(["budget.seq_len=100000"], "budget.seq_len"),
    "misspelled share-group role": Case(["search.share_groups=[[q_proj,nonexistent]]"], "search.share_groups"),
    "unknown expert gene unit": Case(["search.expert_genes=layer"], "search.expert_genes"),
    "coverage above 1": Case(["search.min_coverage=2"], "search.min_coverage"),
    "bits window upside down": Case(["search.bits_window=[5.5,3.5]"], "search.bits_window"),
    "target share out of range": Case(["search.target_slots=1.5"], "search.target_slots"),
    "unknown sensitivity widths": Case(["search.sensitivity_widths=middle"], "search.sensitivity_widths"),
    "unknown predictor prior": Case(["search.predictor_prior=knapsack"], "search.predictor_prior"),
    "table prior under a log target": Case(["search.predictor_prior=table", "predictor=mlp"], "search.predictor_prior"),
    "re-solved moves without target slots": Case(["search.resolve_moves=true", "search.target_slots=0"], "search.resolve_moves"),
    "re-solved moves not a flag": Case(["search.resolve_moves=often"], "search.resolve_moves"),
    "a shrunk table without middle widths": Case(["search.shrink_table=true"], "search.shrink_table"),
    "shrink table not a flag": Case(["search.shrink_table=often"], "search.shrink_table"),
    "a budget with no work": Case(["budget.iterations=0", "budget.n_initial_random=0"], "budget"),
    "negative budget": Case(["budget.batch_size=-4"], "budget.batch_size"),
    "negative seed": Case(["seed=-1"], "seed"),
    "zero threads": Case(["num_threads=0"], "num_threads"),
    "negative plot interval": Case(["plot_every_s=-1"], "plot_every_s"),
    "unknown metric": Case(["metric.kind=mse"], "metric.kind"),
    "metric trim out of range": Case(["metric.trim=0.5"], "metric.trim"),
    "bad predictor option": Case(["predictor.target=sqrt"], "predictor.target"),
    "RBF neighbours without scipy": Case(["predictor=rbf", "predictor.neighbors=50"], "predictor.neighbors"),
    "empty calibration text": Case(
        ["data=c4", "data.path=text", "data.name=null", "data.data_files={train:'{tmp}/calib.txt',validation:'{tmp}/held.txt'}"],
        "data",
        env={"HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": "{home}/hf"},
        setup=empty_calibration_text,
    ),
    "hub dataset offline": Case(["data=wikitext2"], "data"),
    "missing model directory": Case(["model=hf", "model.source.name_or_path=/nonexistent/model"], "model.name_or_path"),
    "W&B online without an API key": Case(["logger=wandb", "logger.mode=online"], "logger.mode", env={"HOME": "{home}", "WANDB_API_KEY": ""}),
    "unwritable output folder": Case([], "paths.log_dir", env={"AMQ_OUTPUT_DIR": "{tmp}/file"}, setup=output_dir_is_a_file),
    "finalize target out of reach": Case(["finalize.enabled=true", "finalize.targets=[2.0]"], "finalize.targets"),
    "unknown export format": Case(["finalize.enabled=true", "finalize.formats=[onnx]"], "finalize.formats"),
    "unknown bits convention": Case(["finalize.enabled=true", "finalize.bits_convention=per_weight"], "finalize.bits_convention"),
    "bad final quantizer option": Case(["finalize.enabled=true", "finalizer=gptq", "finalizer.damp=2"], "finalizer.damp"),
    "unknown zero-shot task": Case(["finalize.enabled=true", "finalize.tasks=[piqa2]"], "finalize.tasks"),
    "zero-shot task files missing offline": Case(
        ["finalize.enabled=true", "finalize.tasks=[bigbench_social_iqa]", "paths.cache_dir={home}/cache"],
        "paths.cache_dir",
        env={"AMQ_OFFLINE": "1", "AMQ_BIGBENCH_SDIST": ""},
    ),
    "resume: not a run directory": Case(["resume={tmp}"], "resume"),
    "resume: another search's directory": Case(["resume={tmp}/run"], "resume", setup=run_with(["seed=7"])),
    "resume: damaged checkpoint": Case(["resume={tmp}/run"], "resume", setup=run_with([], state='{"last_completed_iteration": 1, "spa')),
    "resume in a multirun": Case(["-m", "resume={tmp}/run"], "resume"),
}


def _files(tmp: Path) -> dict[str, bytes]:
    return {str(p.relative_to(tmp)): p.read_bytes() for p in sorted(tmp.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clear_line(name, tmp_path, compose_cfg, monkeypatch, capfd):
    case = CASES[name]
    out, given = tmp_path / "out", tmp_path / "given"
    given.mkdir()
    if case.setup:
        case.setup(given, compose_cfg)
    before = _files(given)
    fill = lambda s: s.replace("{tmp}", str(given)).replace("{home}", str(tmp_path / "home"))  # noqa: E731
    env = {k: fill(v) for k, v in case.env.items()}
    args = [fill(a) for a in case.overrides]
    flags = [a for a in args if a.startswith("-")]  # Hydra's flags (-m) come before the overrides
    proc = run_cli_in_process([*flags, *SMOKE, *(a for a in args if a not in flags)], out, monkeypatch, capfd, env_extra=env)

    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    if case.by_hydra:
        assert proc.returncode == 1 and case.setting in proc.stderr, proc.stderr[-2000:]
    else:
        assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
        errors = [line for line in proc.stderr.splitlines() if "[ERROR]" in line]
        assert len(errors) == 1, proc.stderr[-2000:]
        assert errors[0].split("] - ", 1)[1].startswith(f"{case.setting}:"), errors[0]
        assert "(valid: " in errors[0], errors[0]
    assert run_dirs(out) == [] and not list(out.glob("search/multiruns/*")), "a failed run left a directory behind"
    assert _files(given) == before, "a refused run changed the files it was given"


# ---------------------------------------------------------------------------- README
def troubleshooting_rows() -> dict[str, list[str]]:
    """The README's 'Bad settings' table: problem -> the other cells."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    table = section.split("### Bad settings", 1)[1].split("\n### ", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines() if line.startswith("|")]
    return {r[0]: r[1:] for r in rows[2:]}


def test_readme_troubleshooting_matches_the_catalogue():
    rows = troubleshooting_rows()
    assert set(rows) == set(CASES), f"README rows without a test: {set(rows) - set(CASES)}; cases missing from the README: {set(CASES) - set(rows)}"
    for name, case in CASES.items():
        example, message, _fix = rows[name]
        assert re.search(rf"`{re.escape(case.setting)}[:` ]", message), f"{name}: README says {message!r}, the message names {case.setting!r}"
