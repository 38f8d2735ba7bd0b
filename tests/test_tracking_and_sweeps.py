"""Experiment tracking and sweeps: offline W&B runs of a real multirun, launchers, amq-compare.

The sweeps run the real search (budget=smoke) through Hydra's joblib launcher and the submitit
launcher's local executor; each job's offline W&B run is read back from its `.wandb` file.
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing as mp
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import CONF, ROOT, run_cli
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate

from amq.cli.compare import NotARunError, compare, find_runs
from amq.io import file_lock
from amq.tracking import artifact_paths, summary_values
from amq.tracking.base import MetricLogger
from amq.tracking.null_logger import NullLogger
from amq.tracking.wandb_logger import WandbLogger

# finalize is covered by tests/test_finalize.py; here it would only triple each job's time. Two of
# the sweep file's three predictors (a command-line sweep of a key replaces the file's): one round
# of the joblib launcher's two workers on 2 cores, where three jobs take two.
PREDICTORS = {"rbf", "mlp"}
SWEEP = [
    "sweep=predictor_ablation",
    f"predictor={','.join(sorted(PREDICTORS))}",
    "budget=smoke",
    "num_threads=1",
    "metric.compile=false",
    "finalize.enabled=false",
]


# ---------------------------------------------------------------------------- reading offline runs
def read_wandb_records(path: Path) -> list:
    """Records of an offline run's `.wandb` file (LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    block, pos, buf, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too short for a header: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:  # zero padding up to the next block
            pos += (block - pos % block) % block
            continue
        chunk, pos = data[pos : pos + length], pos + length
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL/FIRST start a record, MIDDLE/LAST extend it
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def offline_run(run_dir: Path) -> dict:
    """What one job's offline W&B run holds: run info, history rows, summary, artifacts, exit code."""
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, f"expected one offline W&B run in {run_dir}, found {files}"
    info: dict = {"history": [], "summary": {}, "artifacts": [], "config": {}, "exit": None, "dir": files[0].parent}
    for rec in read_wandb_records(files[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            info.update(group=rec.run.run_group, name=rec.run.display_name, tags=list(rec.run.tags))
            info["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "history":
            info["history"].append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            info["summary"].update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.summary.update})
        elif kind == "config":
            info["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "artifact":
            info["artifacts"].append((rec.artifact.type, sorted(m.path for m in rec.artifact.manifest.contents)))
        elif kind == "exit":
            info["exit"] = rec.exit.exit_code
    return info


def multirun_dir(out_dir: Path) -> Path:
    dirs = sorted((out_dir / "search" / "multiruns").iterdir())
    assert len(dirs) == 1, dirs
    return dirs[0]


def check_sweep_jobs(sweep_dir: Path) -> list[Path]:
    assert sweep_dir.name.endswith("_predictor_ablation")
    jobs = find_runs([sweep_dir])
    assert len(jobs) == len(PREDICTORS)
    seen = set()
    for job in jobs:
        for name in ("config.yaml", "archive.jsonl", "front.json", "front.png", "metrics.jsonl", "summary.json", "sensitivity.json"):
            assert (job / name).is_file(), f"{job} lacks {name}"
        rows = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((job / "summary.json").read_text())
        run = offline_run(job)
        assert run["exit"] == 0
        # one sweep, one group; the run's name and tags come from its overrides
        assert run["group"] == sweep_dir.name
        predictor = run["name"].split("predictor=")[1].split(",")[0]
        seen.add(predictor)
        assert f"predictor={predictor}" in run["tags"] and "budget=smoke" in run["name"]
        assert "num_threads" not in run["name"]  # settings that don't change results stay out
        # the resolved config, as plain values
        assert run["config"]["predictor"]["_target_"].rsplit(".", 1)[-1].lower().startswith(predictor)
        # per iteration: the metrics row (iteration as step) and the front table; the plot where the
        # iteration redrew it (plot_every_s), and always at the last one
        steps = {}
        for h in run["history"]:
            steps.setdefault(h["_step"], {}).update(h)
        assert sorted(steps) == [r["iteration"] for r in rows]
        for r in rows:
            h = steps[r["iteration"]]
            assert h["hypervolume"] == pytest.approx(r["hypervolume"]) and h["n_evaluated"] == r["n_evaluated"]
            assert any(k.startswith("best/jsd@") for k in h)
            assert h["front/table/_type"] == "table-file"
        assert steps[rows[-1]["iteration"]]["front/plot/_type"] == "image-file"
        # the summary and the result files
        s = run["summary"]
        assert s["final_hypervolume"] == pytest.approx(summary["final_hypervolume"]) == pytest.approx(rows[-1]["hypervolume"])
        assert s["true_evaluations"] == summary["true_evaluations"] and s["search_seconds"] > 0
        for t, best in summary["best_at_target"].items():
            assert s[f"best/jsd@{t}"] == pytest.approx(best["jsd"])
        assert s["final_front/table/nrows"] == len(json.loads((job / "front.json").read_text())["front"])
        # the run's result files, whichever stages wrote them (tracking/report.py's RUN_ARTIFACTS)
        assert ("amq-search", sorted(p.name for p in artifact_paths(job))) in run["artifacts"]
        assert {"archive.jsonl", "front.json", "sensitivity.json", "summary.json"} <= {p.name for p in artifact_paths(job)}
        assert list(run["dir"].glob("files/media/table/front/table_*.table.json"))
    assert seen == PREDICTORS
    return jobs


# ---------------------------------------------------------------------------- the joblib sweep
@pytest.fixture(scope="module")
def joblib_sweep(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("joblib_sweep")
    proc = run_cli(SWEEP, out, timeout=900, env_extra={"WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    sweep_dir = multirun_dir(out)
    launcher = yaml.safe_load((sweep_dir / "multirun.yaml").read_text())["hydra"]["launcher"]["_target_"]
    assert launcher.endswith("JoblibLauncher")  # the default launcher of -m
    return sweep_dir


@pytest.mark.slow
def test_joblib_sweep_gives_each_job_a_run_dir_and_an_offline_wandb_run(joblib_sweep):
    jobs = check_sweep_jobs(joblib_sweep)
    assert len({j.resolve() for j in jobs}) == len(jobs)


@pytest.mark.slow
def test_amq_compare_on_the_multirun_dir(joblib_sweep, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "amq.cli.compare", str(joblib_sweep), "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    table = proc.stdout
    assert table.startswith("| run | overrides | final hypervolume | best jsd @4 |")
    body = [line for line in table.splitlines() if line.startswith("| ") and "predictor=" in line]
    assert len(body) == len(PREDICTORS) and {line.split("predictor=")[1].split()[0] for line in body} == PREDICTORS
    assert "budget=smoke" not in table  # common to every job: not what the comparison is about
    png = tmp_path / "compare.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (tmp_path / "compare.csv").read_text().splitlines()
    assert len(rows) == 1 + len(PREDICTORS) and rows[0].startswith("run,overrides,final hypervolume")
    summaries = [json.loads((j / "summary.json").read_text()) for j in find_runs([joblib_sweep])]
    for line, s in zip(rows[1:], summaries):
        assert f"{s['final_hypervolume']:.4f}" in line and f",{s['true_evaluations']}," in line


# ---------------------------------------------------------------------------- submitit (local executor)
@pytest.mark.slow
@pytest.mark.heavy  # make test-all: the joblib sweep covers multiruns in make test
def test_submitit_local_sweep(tmp_path):
    proc = run_cli([*SWEEP, "hydra/launcher=local_submitit"], tmp_path, timeout=900, env_extra={"WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    sweep_dir = multirun_dir(tmp_path)
    assert list(sweep_dir.glob(".submitit/*/*_result.pkl")), "jobs did not run through submitit"
    check_sweep_jobs(sweep_dir)


# ---------------------------------------------------------------------------- fast checks
def test_amq_compare_refuses_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(NotARunError, match="not an amq run directory"):
        compare([tmp_path])
    proc = subprocess.run([sys.executable, "-m", "amq.cli.compare", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not an amq run directory" in proc.stderr and not proc.stdout


def test_loggers_implement_the_protocol():
    for cls in (NullLogger, WandbLogger):
        for method in ("start", "log", "log_front", "summary", "log_artifacts", "finish"):
            assert callable(getattr(cls, method, None)), f"{cls.__name__} lacks {method}"
    null: MetricLogger = NullLogger()
    null.start("/nonexistent", {}, "x")
    null.finish(failed=True)


def test_a_failed_run_still_finishes_its_wandb_run(tmp_path):
    """finish(failed=True) closes the run with a non-zero exit code (what train_search's finally does)."""
    logger = WandbLogger(mode="offline", name="fails", tags=["t" * 100, "predictor=mlp", "predictor=mlp"])
    assert logger.tags == ["t" * 64, "predictor=mlp"]
    logger.start(str(tmp_path), {"a": {"b": [1, 2]}}, name="fallback")
    logger.log({"hypervolume": 0.5, "best/jsd@4": None}, step=0)
    logger.finish(failed=True)
    import wandb

    wandb.teardown()  # the W&B service writes the run file asynchronously; wait for it to close
    run = offline_run(tmp_path)
    assert run["exit"] == 1 and run["name"] == "fails" and run["config"]["a"] == {"b": [1, 2]}
    assert run["history"][0]["hypervolume"] == 0.5 and "best/jsd@4" not in run["history"][0]


def test_disabled_mode_records_nothing(tmp_path):
    logger = WandbLogger(mode="disabled")
    logger.start(str(tmp_path), {}, name="x")
    logger.log({"hypervolume": 1.0}, step=0)
    logger.finish()
    assert not list((tmp_path / "wandb").glob("offline-run-*"))


def test_summary_values_flatten_summary_json():
    summary = {
        "final_hypervolume": 0.6,
        "true_evaluations": 16,
        "front_size": 9,
        "peak_rss_mb": 900.0,
        "seconds": {"search": 12.5, "total": 30.0},
        "best_at_target": {"4.5": {"avg_bits": 4.5, "avg_bits_weights_only": 4.0, "jsd": 0.05, "iteration": 1}},
        "evaluations": {"archived": 16, "reused_from_cache": 3, "failed": 0},
    }
    assert summary_values(summary) == {
        "final_hypervolume": 0.6,
        "true_evaluations": 16,
        "front_size": 9,
        "peak_rss_mb": 900.0,
        "search_seconds": 12.5,
        "total_seconds": 30.0,
        "evaluations_reused": 3,
        "evaluations_failed": 0,
        "best/jsd@4.5": 0.05,
        "best_bits/avg_bits@4.5": 4.5,
        "best_bits/avg_bits_weights_only@4.5": 4.0,
    }
    assert artifact_paths("/nonexistent") == []


@pytest.mark.parametrize("sweep", sorted(p.stem for p in (CONF / "sweep").glob("*.yaml")))
def test_sweep_files_compose_as_multiruns(compose_cfg, sweep):
    cfg = compose_cfg([f"sweep={sweep}", "budget=smoke"])
    assert cfg.sweep_name == sweep and str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    params = cfg.hydra.sweeper.params
    assert params and all("," in str(v) for v in params.values())
    for key, values in params.items():  # every swept value is a valid override of the composed config
        for value in str(values).split(","):
            compose_cfg([f"sweep={sweep}", f"{key}={value}"])


def test_predictor_ablation_sweeps_every_predictor_option(compose_cfg):
    options = {p.stem for p in (CONF / "predictor").glob("*.yaml")}
    assert set(str(compose_cfg(["sweep=predictor_ablation"]).hydra.sweeper.params.predictor).split(",")) == options


@pytest.mark.parametrize(
    "experiment, model",
    [
        ("paper_llama2_7b", "meta-llama/Llama-2-7b-hf"),
        ("paper_mistral_7b", "mistralai/Mistral-7B-v0.3"),
        ("paper_qwen25_7b", "Qwen/Qwen2.5-7B"),
    ],
)
def test_paper_experiments_are_the_reference_setting(compose_cfg, experiment, model):
    cfg = compose_cfg([f"experiment={experiment}"])
    assert cfg.model.source.name_or_path == model
    assert list(cfg.search.bits) == [2, 3, 4] and cfg.quantizer.group_size == 128 and cfg.search.pruning.threshold == 2.0
    assert cfg.budget.iterations == 200 and cfg.budget.batch_size == 50 and cfg.predictor._target_.endswith("RBFPredictor")


@pytest.mark.parametrize(
    "launcher, target",
    [
        ("joblib", "JoblibLauncher"),
        ("local_submitit", "LocalLauncher"),
        ("slurm", "SlurmLauncher"),
    ],
)
def test_launcher_options_compose(compose_cfg, launcher, target):
    cfg = compose_cfg([f"hydra/launcher={launcher}"])
    assert cfg.hydra.launcher._target_.endswith(target)


def test_wandb_logger_config_names_runs_after_overrides(compose_cfg):
    cfg = compose_cfg(["logger=wandb", "predictor=mlp", "seed=3", "num_threads=1"])
    outside = instantiate(cfg.logger)  # no Hydra job (compose API): no name, tags or group
    assert (outside.name, outside.tags, outside.group) == (None, [], None)
    HydraConfig.instance().set_config(cfg)
    try:
        logger = instantiate(cfg.logger)
    finally:
        HydraConfig.instance().cfg = None
    assert logger.name == "predictor=mlp,seed=3" and "seed=3" in logger.tags  # num_threads left out of the name
    assert logger.group is None  # a single run joins no sweep group


def _try_lock(path: str, q) -> None:
    fh = open(f"{path}.lock", "a")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        q.put("acquired")
    except BlockingIOError:
        q.put("blocked")


def test_file_lock_excludes_other_processes(tmp_path):
    target = tmp_path / "cache" / "entry.pt"
    ctx = mp.get_context("spawn")
    with file_lock(target):
        q = ctx.Queue()
        p = ctx.Process(target=_try_lock, args=(str(target), q))
        p.start()
        p.join(60)
        assert q.get(timeout=10) == "blocked"
    q = ctx.Queue()
    p = ctx.Process(target=_try_lock, args=(str(target), q))
    p.start()
    p.join(60)
    assert q.get(timeout=10) == "acquired"
