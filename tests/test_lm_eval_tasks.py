"""Any lm-eval task in finalize.tasks: few-shot examples and batch size reach lm-eval, lm-eval's own
results file lands next to eval.json, and bad task settings fail in one line before any model loads.

The few-shot runs use an offline BIG-bench task (its source package comes as in tests/test_zeroshot.py):
on the real SmolLM2 through the evaluation suite the finalize stage builds, and through the stage's
export itself on a tiny random-weight model (quantizing SmolLM2 for real would take minutes here).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SMOKE, run_cli_in_process, run_dirs

from amq.bits import BitConfig
from amq.config.compose import build, eval_suite, finalizer_for, load_model_and_data
from amq.data.corpora import keep_parsed
from amq.errors import ConfigError
from amq.evaluation import task_index, zeroshot
from amq.evaluation.task_index import INDEX_DIR, index_file, task_manager
from amq.evaluation.zeroshot import LM_EVAL_RESULTS, write_lm_eval_results
from amq.finalize.selection import Candidate
from amq.finalize.settings import task_settings
from amq.modeling.loading import EmbeddedGGUF

TASK = "bigbench_social_iqa"
LIMIT = 4
SHOTS = 2
FINALIZE = [
    "finalize.enabled=true",
    f"finalize.tasks=[{TASK}]",
    f"finalize.num_fewshot={SHOTS}",
    f"finalize.task_limit={LIMIT}",
    "finalize.task_batch_size=4",
    "finalize.formats=[]",
]


def test_few_shot_task_on_smollm2_keeps_lm_evals_results(compose_cfg, tmp_path, bigbench_tasks):
    cfg = compose_cfg([*SMOKE, *FINALIZE])
    torch.set_num_threads(int(cfg.num_threads))
    cache = Path(cfg.paths.cache_dir)
    lm = build(cfg.model.source, "model").load(cache)
    suite = eval_suite(cfg.finalize, keep_parsed(build(cfg.data, "data"), cache).load(), lm.add_bos, cache)
    evaluation = suite.run(lm.model, lm.tokenizer, "unquantized", keep_lm_eval=True)
    write_lm_eval_results(tmp_path / LM_EVAL_RESULTS, evaluation.pop("lm_eval"))
    results = json.loads((tmp_path / LM_EVAL_RESULTS).read_text())

    assert results["n-shot"][TASK] == SHOTS and results["configs"][TASK]["num_fewshot"] == SHOTS
    assert results["configs"][TASK]["fewshot_split"] == "test"  # examples from the task's other documents
    assert results["n-samples"][TASK]["effective"] == LIMIT and results["config"]["limit"] == LIMIT
    assert results["config"]["batch_size"] == 4 and results["config"]["fewshot_seed"] == 0
    ours = evaluation["zero_shot"][TASK]
    assert (ours["num_fewshot"], ours["n"], ours["limit"], ours["source"]) == (SHOTS, LIMIT, LIMIT, "bigbench-1.0.0 social_iqa")
    assert ours["acc"] == results["results"][TASK]["acc,none"] and ours["acc_norm"] == results["results"][TASK]["acc_norm,none"]
    protocol = evaluation["protocol"]
    assert (protocol["tasks"], protocol["num_fewshot"], protocol["task_batch_size"], protocol["task_limit"]) == ([TASK], SHOTS, 4, LIMIT)


def test_stage_writes_lm_evals_results_next_to_eval_json(compose_cfg, tmp_path, bigbench_tasks):
    cfg = compose_cfg([*SMOKE, *FINALIZE, "model=random", "finalize.num_fewshot=1"])
    md = load_model_and_data(cfg)
    finalizer = finalizer_for(cfg, md, tmp_path, "jsd")
    row = finalizer.export(8.5, Candidate(BitConfig({n: 8 for n in md.layout.names}, 64), 8.5, 8.0, 0.0, 0))
    model_dir = tmp_path / "models" / "8.5"
    evaluation = json.loads((model_dir / "eval.json").read_text())
    results = json.loads((model_dir / LM_EVAL_RESULTS).read_text())
    assert "lm_eval" not in evaluation  # lm-eval's dict has its own file
    assert results["n-shot"][TASK] == 1 and results["n-samples"][TASK]["effective"] == LIMIT
    assert evaluation["zero_shot"][TASK]["acc"] == results["results"][TASK]["acc,none"] == row["zero_shot"][TASK]
    assert evaluation["zero_shot"][TASK]["num_fewshot"] == 1 and evaluation["protocol"]["num_fewshot"] == 1
    assert f"{TASK} (1-shot accuracy)" in (model_dir / "README.md").read_text()


@pytest.mark.parametrize(
    "override, setting",
    [
        ("finalize.num_fewshot=-1", "finalize.num_fewshot"),
        ("finalize.num_fewshot={hellaswag:5}", "finalize.num_fewshot"),
        (f"finalize.num_fewshot={{{TASK}:many}}", f"finalize.num_fewshot.{TASK}"),
        ("finalize.task_batch_size=0", "finalize.task_batch_size"),
        ("finalize.task_limit=0", "finalize.task_limit"),
    ],
)
def test_bad_task_settings_name_the_setting(compose_cfg, override, setting):
    with pytest.raises(ConfigError) as err:
        task_settings(compose_cfg([f"finalize.tasks=[{TASK}]", override]).finalize)
    assert str(err.value).startswith(f"{setting}: ") and "(valid: " in str(err.value)


def test_per_task_few_shot_from_the_command_line(compose_cfg):
    settings = task_settings(compose_cfg([f"finalize.tasks=[{TASK},arc_easy]", "finalize.num_fewshot={arc_easy:25}"]).finalize)
    assert (settings.fewshot("arc_easy"), settings.fewshot(TASK)) == (25, None)
    assert settings.describe()["num_fewshot"] == {"arc_easy": 25}


def _refused(args: list[str], tmp_path, monkeypatch, capfd, env: dict[str, str] | None = None) -> str:
    """Run amq-search in this process; the one error line, after checking nothing loaded or stayed."""
    monkeypatch.setattr(EmbeddedGGUF, "load", lambda *a, **k: pytest.fail("the model loaded before the tasks were checked"))
    out = tmp_path / "out"
    proc = run_cli_in_process([*SMOKE, "finalize.enabled=true", *args], out, monkeypatch, capfd, env_extra=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert run_dirs(out) == [], "a refused run left a directory behind"
    return errors[0].split("] - ", 1)[1]


def test_unknown_task_is_refused_before_the_model_loads(tmp_path, monkeypatch, capfd):
    line = _refused(["finalize.tasks=[hellaswagg]"], tmp_path, monkeypatch, capfd)
    assert line.startswith("finalize.tasks: unknown task 'hellaswagg'; did you mean hellaswag"), line
    assert "lm-eval ls tasks" in line and TASK in line, line


@pytest.mark.parametrize("offline", ["HF_DATASETS_OFFLINE", "hub unreachable"])
def test_hub_task_offline_is_one_line_naming_the_setting(offline, tmp_path, monkeypatch, capfd):
    import datasets

    if offline == "HF_DATASETS_OFFLINE":  # `datasets` read its setting at import: set it there too
        env = {"HF_DATASETS_OFFLINE": "1"}
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
        expected = "HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set and `datasets`' cache does not hold it"
    else:
        env = {}
        for flag in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
            monkeypatch.delenv(flag, raising=False)
        monkeypatch.setattr(zeroshot, "hub_reachable", lambda *a, **k: False)
        expected = "need(s) the Hugging Face dataset hub, which is unreachable from here"
    line = _refused(["finalize.tasks=[hellaswag]"], tmp_path, monkeypatch, capfd, env)
    assert line.startswith("finalize.tasks: ") and "hellaswag (dataset Rowan/hellaswag)" in line and expected in line, line
    assert "run once with network" in line and TASK in line, line


def test_builtin_task_index_is_kept_in_the_cache_and_read_back(compose_cfg, tmp_path):
    """lm-eval's index of its built-in tasks is built once per cache (seconds of YAML parsing) and
    read back after, the same names; lm-eval's own index builder is left as it was."""
    from lm_eval.tasks import _index

    builder = _index.TaskIndex.__dict__["build"]
    cache = Path(compose_cfg(SMOKE).paths.cache_dir)
    first = task_manager(["hellaswag"], [], cache)
    path = index_file(cache / INDEX_DIR)
    stamp = path.stat().st_mtime_ns
    second = task_manager(["hellaswag", "arc_easy"], [], cache)
    assert path.stat().st_mtime_ns == stamp  # read, not built again
    assert second.all_tasks == first.all_tasks and {"hellaswag", "arc_easy"} <= set(second.all_tasks)
    assert second.all_groups == first.all_groups and second.all_tags == first.all_tags
    assert _index.TaskIndex.__dict__["build"] is builder
    damaged = tmp_path / "index.pkl"
    damaged.write_bytes(b"\x80\x05 not a pickle")
    assert task_index._read(damaged) is None  # a damaged file is built again, not trusted
