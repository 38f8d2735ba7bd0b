"""W&B for the whole path (search, amq-finalize, amq-evaluate) and sweeps that finish (SLURM requeue).

The end-to-end tests run the real smoke search on SmolLM2 with an offline W&B run, then the later
commands on its results, and read every offline run back from its `.wandb` file: one group, a job
type per stage, the evaluation table and a `model` artifact per exported model. The SLURM launcher
is checked through its composed config and submitit's own sbatch rendering (no cluster here); the
requeue itself runs for real through submitit's local executor (a USR2, as SLURM sends before the limit).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, SMOKE, main_in_process, run_command
from omegaconf import OmegaConf
from test_tracking_and_sweeps import multirun_dir, read_wandb_records

from amq.errors import ConfigError
from amq.tracking.null_logger import NullLogger
from amq.tracking.report import evaluation_table, model_artifact_name, model_metadata, perplexity_series
from amq.tracking.stages import search_run_of, stage_logger
from amq.tracking.wandb_logger import WandbLogger


# ---------------------------------------------------------------------------- reading offline runs
def wandb_runs(directory: Path) -> list[dict]:
    """Every offline W&B run under `directory`/wandb/: identity, history keys, summary, artifacts."""
    runs = []
    for path in sorted((directory / "wandb").glob("offline-run-*/run-*.wandb")):
        run: dict = {"dir": path.parent, "history": {}, "summary": {}, "charts": {}, "artifacts": [], "exit": None}
        for rec in read_wandb_records(path):
            kind = rec.WhichOneof("record_type")
            if kind == "config":  # custom charts: their specs under _wandb.visualize, their data a table
                for i in rec.config.update:
                    if list(i.nested_key[:2]) == ["_wandb", "visualize"]:
                        run["charts"][i.nested_key[2]] = json.loads(i.value_json)["panel_config"]["panelDefId"]
            if kind == "run":
                run.update(group=rec.run.run_group, job_type=rec.run.job_type, name=rec.run.display_name, tags=list(rec.run.tags))
            elif kind == "history":
                run["history"].update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
            elif kind == "summary":
                run["summary"].update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.summary.update})
            elif kind == "artifact":
                a = rec.artifact
                contents = {m.path: {"size": m.size, "ref": m.ref} for m in a.manifest.contents}
                run["artifacts"].append(
                    {"type": a.type, "name": a.name, "metadata": json.loads(a.metadata or "{}"), "description": a.description, "files": contents}
                )
            elif kind == "exit":
                run["exit"] = rec.exit.exit_code
        runs.append(run)
    return runs


def logged_table(run: dict, key: str) -> dict:
    """A wandb.Table the run logged under `key`, read from the run's media files."""
    assert run["history"][f"{key}/_type"] == "table-file"
    return json.loads((run["dir"] / "files" / run["history"][f"{key}/path"]).read_text())


def check_model_artifacts(run: dict, output_dir: Path, finalizer: str) -> None:
    """One `model` artifact per models/<target>/, holding its files, its card and its bits."""
    models = sorted((output_dir / "models").iterdir())
    arts = [a for a in run["artifacts"] if a["type"] == "model"]
    assert len(arts) == len(models) >= 1
    report = json.loads((output_dir / "evaluation.json").read_text())
    for model, art in zip(models, sorted(arts, key=lambda a: a["metadata"]["target"])):
        meta = art["metadata"]
        row = next(r for r in report["rows"] if r["kind"] == "target" and f"{r['target']:g}" == model.name)
        assert meta["target"] == row["target"] and meta["avg_bits"] == pytest.approx(row["avg_bits"]) and meta["avg_bits"] <= row["target"]
        assert meta["finalizer"]["name"] == finalizer and meta["run_group"] == run["group"]
        assert meta["bit_config"] == json.loads((model / "bit_config.json").read_text())
        assert meta["perplexity"] == row["perplexity"]
        assert art["name"] == f"smollm2-135m-instruct-{finalizer}-{model.name}bit"
        assert art["description"] == (model / "README.md").read_text()  # the model card
        on_disk = {p.relative_to(model).as_posix(): p.stat().st_size for p in model.rglob("*") if p.is_file()}
        assert {p: f["size"] for p, f in art["files"].items()} == on_disk
        assert {"README.md", "amq_packed.safetensors", "bit_config.json"} <= set(art["files"])  # the card, weights, bits


def check_evaluation(run: dict, output_dir: Path) -> dict:
    """The evaluation rows as a table (every row of evaluation.json), the perplexity-vs-bits charts."""
    report = json.loads((output_dir / "evaluation.json").read_text())
    table = logged_table(run, "evaluation/table")
    columns = table["columns"]
    assert len(table["data"]) == len(report["rows"])
    for text in {t for r in report["rows"] for t in r.get("perplexity") or {}}:
        ppl = sorted(r["perplexity"][text] for r in report["rows"])
        assert sorted(row[columns.index(f"ppl/{text}")] for row in table["data"]) == pytest.approx(ppl)
        assert run["charts"][f"evaluation/ppl_vs_bits/{text}"] == "wandb/lineseries/v0"
        chart = logged_table(run, f"evaluation/ppl_vs_bits/{text}_table")  # the chart's points
        points = [dict(zip(chart["columns"], row)) for row in chart["data"]]  # step (bits), lineKey (series), lineVal
        for r in report["rows"]:
            series = {"uniform": "uniform", "unquantized": "unquantized"}.get(r["kind"], "amq (exported + front)")
            mine = [p for p in points if p["lineKey"] == series and p["lineVal"] == pytest.approx(r["perplexity"][text])]
            assert mine and (series == "unquantized" or mine[0]["step"] == pytest.approx(r["avg_bits"]))
    for chart in ("perplexity_vs_bits", "proxy_vs_perplexity"):  # the stage's PNGs, drawn when it had points enough
        assert run["history"].get(f"evaluation/{chart}/_type") == ("image-file" if (output_dir / f"{chart}.png").is_file() else None)
    for row in table["data"]:
        if row[columns.index("kind")] == "target":
            assert row[columns.index("model_artifact")].endswith(f"-{row[columns.index('target')]:g}bit")
    return dict(zip(["columns", "rows"], [columns, table["data"]]))


# ---------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def finalized(awq_finalized) -> Path:
    """The shared search's AWQ `amq-finalize` directory (conftest)."""
    return awq_finalized.out


@pytest.mark.slow
def test_search_then_amq_finalize_awq_are_two_runs_of_one_group(searched, finalized):
    """The Done-when check: two offline runs in one group; the second has the finalize job type, an
    evaluation table and a model artifact per exported model."""
    (search,) = wandb_runs(searched)
    (final,) = wandb_runs(finalized)
    assert search["group"] == final["group"] == searched.name  # a single run is a group of its own
    assert (search["job_type"], final["job_type"]) == ("search", "finalize")
    assert search["exit"] == final["exit"] == 0
    assert final["name"].endswith("/finalize") and "finalizer=awq" in final["tags"]
    check_evaluation(final, finalized)
    check_model_artifacts(final, finalized, "awq")
    report = json.loads((finalized / "evaluation.json").read_text())
    (row,) = [r for r in report["rows"] if r["kind"] == "target"]
    for text, ppl in row["perplexity"].items():
        assert final["summary"][f"final/ppl_{text}@4.25"] == pytest.approx(ppl)


@pytest.mark.slow
def test_the_search_logs_its_own_finalize_stage(searched):
    """The search's own finalize stage: its models and evaluation, next to the uniform baseline."""
    (search,) = wandb_runs(searched)
    assert any(a["type"] == "amq-search" for a in search["artifacts"])
    table = check_evaluation(search, searched)
    kinds = {row[table["columns"].index("kind")] for row in table["rows"]}
    assert {"target", "uniform", "unquantized"} <= kinds  # the chart's baselines
    assert search["history"]["evaluation/perplexity_vs_bits/_type"] == "image-file"
    check_model_artifacts(search, searched, "hqq")


@pytest.mark.slow
def test_amq_evaluate_logs_in_the_search_group(searched, finalized):
    model = finalized / "models" / "4.25"
    proc = run_command("evaluate", [str(model), "--threads", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = wandb_runs(finalized)
    (evaluation,) = [r for r in runs if r["job_type"] == "evaluate"]
    assert evaluation["group"] == searched.name and evaluation["exit"] == 0
    table = logged_table(evaluation, "evaluation/table")
    (row,) = table["data"]
    result = json.loads((model / "eval.json").read_text())
    for text, v in result["perplexity"].items():
        assert row[table["columns"].index(f"ppl/{text}")] == pytest.approx(v["perplexity"])
        assert row[table["columns"].index(f"rel_diff/{text}")] < 1e-3  # compared with the finalize stage's
        assert evaluation["summary"][f"eval/ppl_{text}@4.25"] == pytest.approx(v["perplexity"])
    assert row[table["columns"].index("finalizer")] == "awq"


@pytest.mark.slow
@pytest.mark.heavy  # make test-all: the W&B path of amq-finalize runs in make test through the group test
def test_amq_finalize_takes_logger_overrides(smoke_run, tmp_path):
    """A search that logged nothing (logger=none) finalized with `logger=wandb logger.mode=offline`."""
    run_dir = Path(shutil.copytree(smoke_run[0], tmp_path / "run"))
    args = ["logger=wandb", "logger.mode=offline", "finalize.targets=[4.0]", "finalize.baselines=false", "finalize.extra_front_points=0"]
    proc = run_command("finalize", [str(run_dir), *args, "finalize.max_windows=1", "finalize.formats=[]", "num_threads=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out,) = (run_dir / "finalized").iterdir()
    assert not (run_dir / "wandb").exists()
    (final,) = wandb_runs(out)
    assert (final["group"], final["job_type"], final["exit"]) == ("run", "finalize", 0)
    assert "logger.mode=offline" not in final["tags"]
    check_model_artifacts(final, out, "hqq")


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, setting",
    [(["logger.mode=sometimes"], "logger.mode"), (["logger.model_files=all"], "logger.model_files"), (["logger=mlflow"], "overrides")],
)
def test_amq_finalize_refuses_bad_logger_settings(searched, args, setting, monkeypatch, capfd):
    from amq.cli.finalize import main

    monkeypatch.delenv("WANDB_MODE", raising=False)  # as run_command: the mode the search recorded applies
    proc = main_in_process("amq-finalize", main, [str(searched), *args], capfd)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1 and errors[0].split("] - ", 1)[1].startswith(f"{setting}:") and "(valid: " in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (searched / "finalized").exists() or len(list((searched / "finalized").iterdir())) <= 1


# ---------------------------------------------------------------------------- without a model
REPORT = {
    "model": "tiny",
    "bits_convention": "with_meta",
    "proxy_fidelity": {"proxy": "proxy_jsd", "n": 2},
    "rows": [
        {"kind": "unquantized", "avg_bits": 16.0, "avg_bits_weights_only": 16.0, "proxy_jsd": 0.0, "perplexity": {"wiki": 20.0}},
        {"kind": "uniform", "avg_bits": 3.5, "avg_bits_weights_only": 3.0, "proxy_jsd": 0.3, "perplexity": {"wiki": 90.0}, "zero_shot": {"siqa": 0.4}},
        {"kind": "front", "avg_bits": 4.8, "avg_bits_weights_only": 4.3, "proxy_jsd": 0.02, "perplexity": {"wiki": 24.0}},
        {
            "kind": "target",
            "target": 4.5,
            "dir": "/elsewhere/models/4.5",
            "avg_bits": 4.4,
            "avg_bits_weights_only": 3.9,
            "proxy_jsd": 0.04,
            "perplexity": {"wiki": 26.0},
            "zero_shot": {"siqa": 0.45},
            "bytes_on_disk": 3 * 2**20,
        },
    ],
}


def test_evaluation_table_holds_every_row_by_bits():
    columns, rows = evaluation_table(REPORT, {"4.5": "tiny-hqq-4.5bit"})
    assert columns == ["row", "kind", "target", "avg_bits", "avg_bits_weights_only", "proxy_jsd", "ppl/wiki", "acc/siqa", "mib_on_disk", "model_artifact"]
    assert [r[0] for r in rows] == ["uniform 3-bit", "target 4.5", "front", "unquantized"]
    assert rows[1][6:] == [26.0, 0.45, 3.0, "tiny-hqq-4.5bit"] and rows[0][7] == 0.4 and rows[2][7] is None


def test_perplexity_series_put_the_search_next_to_the_baselines():
    series = perplexity_series(REPORT, "wiki")
    assert series == {
        "amq (exported + front)": ([4.4, 4.8], [26.0, 24.0]),
        "uniform": ([3.5], [90.0]),
        "unquantized": ([3.5, 4.8], [20.0, 20.0]),  # a level line over the quantized range
    }
    assert perplexity_series(REPORT, "lee") == {}


def fake_model_dir(base: Path, target: str = "4.5") -> Path:
    """A model directory's files as the export writes them (the weights file a stand-in)."""
    d = base / "models" / target
    (d / "compressed-tensors").mkdir(parents=True)
    modules = {f"layers.{i}.proj": {"bits": b, "group_size": 64, "in_features": 64, "out_features": 128} for i, b in enumerate([4, 4, 8, 3])}
    (d / "amq_quant.json").write_text(
        json.dumps({"format": "amq-packed", "version": 1, "dtype": "bfloat16", "quantizer": {"name": "hqq"}, "group_size": 64, "modules": modules})
    )
    (d / "bit_config.json").write_text(json.dumps({"version": 1, "group_size": 64, "bits": {n: m["bits"] for n, m in modules.items()}}))
    (d / "README.md").write_text("# tiny quantized by amq\n")
    (d / "amq_packed.safetensors").write_bytes(b"\0" * 4096)
    (d / "compressed-tensors" / "model.safetensors").write_bytes(b"\1" * 2048)
    return d


def test_model_metadata_from_the_directory_and_the_report(tmp_path):
    d = fake_model_dir(tmp_path)
    meta = model_metadata(d)
    assert meta["avg_bits_weights_only"] == pytest.approx(19 / 4) and meta["avg_bits"] == pytest.approx(19 / 4 + 0.5)
    assert meta["target"] == 4.5 and meta["linears_per_width"] == {"3": 1, "4": 2, "8": 1} and meta["finalizer"] == {"name": "hqq"}
    with_report = model_metadata(d, REPORT)  # the stage's row of the same directory name
    assert with_report["avg_bits"] == 4.4 and with_report["perplexity"] == {"wiki": 26.0} and with_report["zero_shot"] == {"siqa": 0.45}
    assert model_artifact_name(with_report) == "tiny-hqq-4.5bit"


def test_reference_mode_keeps_weights_out_of_the_artifact(tmp_path):
    """model_files=reference: weights as file:// references (checksummed, not uploaded), the card uploaded."""
    d = fake_model_dir(tmp_path / "stage")
    logger = WandbLogger(mode="offline", job_type="finalize", group="g", model_files="reference")
    logger.start(str(tmp_path / "stage"), {}, name="x")
    logger.log_finalize(tmp_path / "stage")
    logger.finish()
    import wandb

    wandb.teardown()  # the W&B service writes the run file asynchronously; wait for it to close
    (run,) = wandb_runs(tmp_path / "stage")
    (art,) = run["artifacts"]
    assert art["type"] == "model" and art["name"] == "model-hqq-4.5bit" and run["group"] == "g"
    assert art["files"]["amq_packed.safetensors"]["ref"] == (d / "amq_packed.safetensors").absolute().as_uri()
    assert art["files"]["compressed-tensors/model.safetensors"]["ref"].startswith("file://")
    assert art["files"]["README.md"]["ref"] == "" and art["description"] == "# tiny quantized by amq\n"
    assert "evaluation/table" not in run["history"]  # no evaluation.json: models only


def test_bad_model_files_setting_is_refused():
    with pytest.raises(ConfigError, match=r"^logger.model_files: 'all' \(valid: upload, reference, none\)$"):
        WandbLogger(mode="offline", model_files="all")


def fake_search_dir(base: Path, logger: dict | None) -> Path:
    base.mkdir(parents=True)
    (base / "archive.jsonl").write_text("")
    (base / "config.yaml").write_text(yaml.safe_dump({"seed": 0, **({"logger": logger} if logger else {})}))
    return base


def test_stage_loggers_join_the_search_group(tmp_path, monkeypatch):
    recorded = {
        "_target_": "amq.tracking.wandb_logger.WandbLogger",
        "project": "p",
        "mode": "offline",
        "group": None,
        "name": "seed=1",
        "tags": ["seed=1"],
        "job_type": "search",
        "front_every": 1,
    }
    run = fake_search_dir(tmp_path / "2026-01-01_00-00-00", recorded)
    model = run / "finalized" / "t" / "models" / "4.5"
    model.mkdir(parents=True)
    assert search_run_of(model) == search_run_of(run / "models" / "4.5") == run.absolute()
    assert search_run_of(tmp_path) is None
    monkeypatch.delenv("WANDB_MODE", raising=False)
    logger = stage_logger(run, "finalize", tags=["finalizer=awq"])
    assert (logger.group, logger.job_type, logger.name, logger.tags, logger.mode, logger.project) == (
        run.name,
        "finalize",
        "seed=1/finalize",
        ["seed=1", "finalizer=awq"],
        "offline",
        "p",
    )
    monkeypatch.setenv("WANDB_MODE", "disabled")  # as conf/logger/wandb.yaml reads it
    assert stage_logger(run, "evaluate").mode == "disabled"
    sweep = fake_search_dir(tmp_path / "sweep" / "0", {**recorded, "group": "2026_predictor_ablation"})
    assert stage_logger(sweep, "evaluate").group == "2026_predictor_ablation"
    assert isinstance(stage_logger(fake_search_dir(tmp_path / "none", {"_target_": "amq.tracking.null_logger.NullLogger"}), "finalize"), NullLogger)
    assert isinstance(stage_logger(fake_search_dir(tmp_path / "old", None), "finalize"), NullLogger)
    with pytest.raises(ConfigError, match="^logger.mode:"):
        stage_logger(run, "finalize", OmegaConf.create({**recorded, "mode": "sometimes"}))


# ---------------------------------------------------------------------------- SLURM: requeue on timeout
PAPER_SEARCH_HOURS = 23.4  # README: a paper-budget search on one H100


def test_slurm_launcher_requeues_timed_out_jobs(compose_cfg, tmp_path):
    """conf/hydra/launcher/slurm.yaml: a job long enough for a paper search, requeued on its time
    limit (checkpointable launcher, max_num_timeout), with the sbatch lines submitit writes for it."""
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
    from submitit.core.utils import DelayedSubmission
    from submitit.slurm.slurm import _make_sbatch_string

    cfg = compose_cfg(["hydra/launcher=slurm", "sweep=seeds", "resume=auto"])
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params["_target_"].endswith("SlurmLauncher")
    assert params["max_num_timeout"] >= 1 and params["additional_parameters"] == {"requeue": True}
    assert PAPER_SEARCH_HOURS * 60 < params["timeout_min"] <= 48 * 60
    assert 60 <= params["signal_delay_s"] <= 0.2 * 60 * params["timeout_min"]  # submitit: a timeout once past 80% of the limit
    assert params["submitit_folder"].startswith(str(cfg.hydra.sweep.dir))
    sbatch = _make_sbatch_string(
        command="python -m submitit.core._submit folder",
        folder=tmp_path,
        time=params["timeout_min"],
        signal_delay_s=params["signal_delay_s"],
        additional_parameters=params["additional_parameters"],
    )
    assert f"#SBATCH --signal=USR2@{params['signal_delay_s']}" in sbatch
    assert f"#SBATCH --time={params['timeout_min']}" in sbatch and "#SBATCH --requeue" in sbatch.splitlines()
    # the requeued job reruns the same call: the same overrides and job number, hence the same job directory
    launcher = SlurmLauncher(**{k: v for k, v in params.items() if k != "_target_"})
    args = (["seed=1", "resume=auto"], "hydra.sweep.dir", 1, "job_id_for_1", {})
    requeued = launcher.checkpoint(*args)
    assert isinstance(requeued, DelayedSubmission) and requeued.function is launcher and requeued.args == args


def _submitit_tasks(folder: Path) -> list[int]:
    """Processes running a submitit task whose command line names `folder` (not their forked children)."""
    parents = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
                ppid = next(int(line.split()[1]) for line in (proc / "status").read_text().splitlines() if line.startswith("PPid:"))
            except (OSError, StopIteration):
                continue
            if b"submitit.core._submit" in cmd and any(str(folder).encode() in part for part in cmd):
                parents[int(proc.name)] = ppid
    return [pid for pid, ppid in parents.items() if ppid not in parents]


@pytest.mark.slow
@pytest.mark.heavy  # make test-all: resume=auto itself is checked in make test by tests/test_time_budget.py
def test_a_requeued_sweep_job_resumes_its_own_run(tmp_path):
    """Submitit's local executor runs a one-job sweep with resume=auto; the job is signalled as
    SLURM signals it before its time limit (USR2), requeues itself, and the rerun continues the
    same job directory from its checkpoint to the end."""
    args = ["-m", *SMOKE, "seed=3", "resume=auto", "hydra/launcher=local_submitit"]
    env = {**os.environ, "AMQ_OUTPUT_DIR": str(tmp_path), "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    sweep = subprocess.Popen([sys.executable, "-m", "amq.train_search", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and sweep.poll() is None:
            archives = list((tmp_path / "search" / "multiruns").glob("*/0/archive.jsonl"))
            if archives and archives[0].read_text().count("\n") >= 3:  # evaluations archived: a checkpoint to resume
                break
            time.sleep(0.5)
        assert sweep.poll() is None, f"the sweep ended before it could be interrupted:\n{sweep.communicate()[0][-3000:]}"
        (task,) = _submitit_tasks(tmp_path)
        os.kill(task, signal.SIGUSR2)
        output, _ = sweep.communicate(timeout=1500)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 0, output[-4000:]
    job = multirun_dir(tmp_path) / "0"
    log = (job / "train_search.log").read_text()
    assert "resuming" in log, log[-3000:]
    submitit_log = "".join(p.read_text() for p in sorted((multirun_dir(tmp_path) / ".submitit").glob("*/*_log.*")))
    assert "this job is preempted" in submitit_log and "Requeued job" in submitit_log, submitit_log[-3000:]
    rows = [json.loads(line) for line in (job / "archive.jsonl").read_text().splitlines()]
    configs = [json.dumps(r["genes"]) for r in rows]
    assert len(configs) == len(set(configs))  # nothing measured twice
    summary = json.loads((job / "summary.json").read_text())
    assert summary["true_evaluations"] == len(rows) and not summary.get("stopped")
    assert [p.name for p in multirun_dir(tmp_path).iterdir() if p.is_dir() and not p.name.startswith(".")] == ["0"]  # no second job directory
