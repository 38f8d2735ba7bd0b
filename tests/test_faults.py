"""Faults: failed evaluations, out of memory, a full disk, and a graceful stop on SIGINT/SIGTERM.

Each fault is real: a NaN weight in the proxy bank of the real model, the CPU allocator refusing
an allocation, the kernel refusing a write past RLIMIT_FSIZE (what a full disk does to a write,
with EFBIG instead of ENOSPC), and real signals sent to a running search.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, SMOKE, run_cli, run_cli_in_process, run_dirs

from amq.config import compose
from amq.config.compose import memory_settings, prepare, prune
from amq.errors import ResourceError
from amq.run.faults import resource_errors
from amq.search.archive import Archive
from amq.search.sensitivity import measure, paired_stderr

REFERENCE = [*SMOKE, "seed=3"]  # what the smoke_run fixture ran


def _archive(run_dir):
    return [(tuple(d["genes"]), d["metrics"]["jsd"], d["iteration"]) for d in map(json.loads, (run_dir / "archive.jsonl").read_text().splitlines())]


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "[ERROR]" in line]


@pytest.fixture(scope="module")
def workbench(compose_cfg, tmp_path_factory):
    """The real model, data, proxy and metric (smoke budget), and its pruned search space."""
    cfg = compose_cfg([*SMOKE, f"paths.output_dir={tmp_path_factory.mktemp('wb')}"])
    wb = prepare(cfg)
    plan = compose.plan(cfg)
    table, space = prune(wb, plan.pruning, plan.sensitivity_samples, None)
    return cfg, wb, space, table


# ---------------------------------------------------------------------------- failed evaluations
@pytest.mark.slow
def test_nan_evaluation_is_recorded_as_failed_and_the_search_goes_on(workbench, compose_cfg, tmp_path):
    cfg, wb, space, table = workbench
    # A NaN in one linear's 3-bit proxy weights: every configuration with it at 3 bits yields NaN
    poisoned = next(g[0] for g, size in zip(space.groups, space.sizes) if size == len(space.bit_choices))
    wb.bank.apply({poisoned: 3})
    weight = wb.bank.modules[poisoned].weight.data
    kept = weight[0, 0].item()
    weight[0, 0] = float("nan")
    wb.bank.restore()
    try:
        archive = Archive(space, tmp_path / "archive.jsonl")
        plan = compose.plan(compose_cfg([*SMOKE, "budget.n_initial_random=5", "budget.iterations=2", "budget.batch_size=4", "seed=0"]))
        rows = compose.assemble_search(plan, wb, table, space, archive).run()
    finally:
        weight[0, 0] = kept

    assert [r["iteration"] for r in rows] == [0, 1, 2], "the search stopped at the failure"
    failed = [r for r in archive.records if r.failure is not None]
    assert failed and all(math.isinf(r.metric) and "jsd is nan" in r.failure for r in failed)
    assert any(np.isfinite(r.metric) for r in archive.records)
    assert sum(r["n_failed"] for r in rows) == len(failed)
    lines = [json.loads(line) for line in (tmp_path / "archive.jsonl").read_text().splitlines()]
    assert [d["failed"] for d in lines if "failed" in d] == [r.failure for r in failed]
    assert all(d["metrics"]["jsd"] is None for d in lines if "failed" in d)
    reloaded = Archive(space, tmp_path / "archive.jsonl")
    reloaded.load("jsd")
    assert [r.failure for r in reloaded.records] == [r.failure for r in archive.records]


# ---------------------------------------------------------------------------- a stopped sensitivity stage
class StopAfter:
    """The real metric, stopped by an exception after `n` evaluations (a kill in the middle of the stage)."""

    def __init__(self, metric, n: int) -> None:
        self.metric, self.n, self.calls = metric, n, 0
        self.name, self.description = metric.name, metric.description

    def evaluate_tokens(self, model, states=None):
        if self.calls == self.n:
            raise KeyboardInterrupt
        self.calls += 1
        return self.metric.evaluate_tokens(model, states)


@pytest.mark.slow
def test_sensitivity_continues_where_it_stopped(workbench, tmp_path):
    cfg, wb, *_ = workbench
    metric = wb.metric.subset(int(cfg.budget.sensitivity_samples))
    low, high, progress = wb.bits[0], wb.bits[-1], tmp_path / "table.progress.jsonl"
    # linears of the first blocks (whose probes run the whole model) and of the last; the stop
    # falls between them. The stage's path is the same for every linear, so a subset covers it.
    names = wb.layout.names[:7] + wb.layout.names[-7:]
    stop = 9  # the baseline and 8 probes
    with pytest.raises(KeyboardInterrupt):
        measure(wb.bank, StopAfter(metric, stop), low, high, progress, names=names)
    rest = StopAfter(metric, 10_000)
    resumed = measure(wb.bank, rest, low, high, progress, names=names)
    # one pass more than the probes left: the all-highest pass's per-token values, which the
    # probes' standard errors need and the stopped run's progress file does not keep
    assert rest.calls == len(names) + 1 - stop + 1, "measurements made before the stop were made again"
    assert list(resumed.damage) == names
    assert set(resumed.stderr) == {low} and list(resumed.stderr[low]) == names
    # spot checks against fresh measurements, on both sides of the stop (a whole second table
    # would double the test's time for no more coverage: every value goes through the same path)
    wb.bank.apply({n: high for n in wb.layout.names})
    baseline, base_tokens = metric.evaluate_tokens(wb.bank.model)
    assert resumed.baseline == baseline
    for name in (names[0], names[stop - 2], names[stop - 1], names[stop], names[-1]):
        wb.bank.apply({name: low})
        value, tokens = metric.evaluate_tokens(wb.bank.model)
        assert resumed.damage[name] == value - resumed.baseline, name
        assert resumed.stderr[low][name] == pytest.approx(paired_stderr(tokens, base_tokens), rel=1e-9), name
        wb.bank.apply({name: high})


# ---------------------------------------------------------------------------- out of memory
def test_out_of_memory_names_the_settings_to_lower(compose_cfg, tmp_path):
    cfg = compose_cfg(SMOKE)
    with pytest.raises(ResourceError) as info, resource_errors(memory_settings(cfg), tmp_path):
        torch.empty(1 << 50)  # the CPU allocator refuses 4 PiB: a real allocation failure
    msg = str(info.value)
    assert msg.startswith("out of CPU memory")
    for setting in ("metric.batch_size", "metric.chunk_tokens", "quantizer.storage=packed", "budget.n_samples", "budget.seq_len", f"resume={tmp_path}"):
        assert setting in msg


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_out_of_memory_names_the_settings_to_lower(compose_cfg, tmp_path):
    cfg = compose_cfg(SMOKE)
    with pytest.raises(ResourceError, match="out of GPU memory.*quantizer.storage=packed"), resource_errors(memory_settings(cfg), tmp_path):
        torch.empty(1 << 50, device="cuda")


def test_other_errors_pass_through(compose_cfg, tmp_path):
    with pytest.raises(ZeroDivisionError), resource_errors(memory_settings(compose_cfg(SMOKE)), tmp_path):
        1 / 0


# ---------------------------------------------------------------------------- graceful stop, full disk
def _start(args, out_dir, env_extra=None):
    env = {**os.environ, "AMQ_OUTPUT_DIR": str(out_dir), "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "amq.train_search", *args], cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)


def _lines_until(proc, predicate, timeout=600):
    seen = []
    deadline = time.monotonic() + timeout
    for line in proc.stderr:
        seen.append(line)
        if predicate(line) or time.monotonic() > deadline:
            break
    return seen


def _limit_file_size():
    """Writes past 40 KB fail: what a full disk does to a write (EFBIG here instead of ENOSPC)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error from write(), not a killing signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))


@pytest.mark.slow
@pytest.mark.heavy  # make test-all: the resume and time-limit tests keep the single faults in make test
def test_sigterm_then_a_full_disk_then_the_end_matches_an_uninterrupted_run(smoke_run, tmp_path):
    """SIGTERM mid-batch: the evaluation in flight is finished, the W&B run closed, the resume
    command printed, exit 143. That command, run on a full disk: one clear line, exit 3, the
    archive intact. Run again with room: the archive is the uninterrupted run's."""
    from test_tracking_and_sweeps import offline_run

    args = [o for o in REFERENCE if not o.startswith("logger=")] + ["logger=wandb"]
    proc = _start(args, tmp_path, {"WANDB_MODE": "offline"})
    seen = _lines_until(proc, lambda line: "W&B run" in line)
    (run_dir,) = run_dirs(tmp_path)
    while not (run_dir / "archive.jsonl").exists():  # the first evaluation is archived, the second under way
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 143, rest[-3000:]
    stderr = "".join(seen) + rest
    assert "stopping after the evaluation in flight" in stderr and "stopped by SIGTERM" in stderr
    assert "Traceback" not in stderr and not _errors(stderr)
    command = stderr.split("Continue with:", 1)[1].split("\n")[1].strip()
    assert command.startswith("amq-search ") and f"resume={run_dir}" in command
    n_stopped = len(_archive(run_dir))  # every line whole: the evaluation in flight was finished, not torn
    assert n_stopped >= 1
    assert offline_run(run_dir)["exit"] == 1, "the W&B run was not closed (as failed)"

    overrides = command.split()[1:]  # the printed command, as a user would paste it
    env = {**os.environ, "AMQ_OUTPUT_DIR": str(tmp_path), "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    full = subprocess.run(
        [sys.executable, "-m", "amq.train_search", *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, preexec_fn=_limit_file_size
    )
    assert full.returncode == 3, full.stderr[-3000:]
    (error,) = _errors(full.stderr)
    assert "cannot write" in error and "File too large" in error and f"resume={run_dir}" in error
    assert "Traceback" not in full.stderr
    assert n_stopped <= len(_archive(run_dir)) < len(_archive(smoke_run[0]))  # whole lines only
    json.loads((run_dir / "state.json").read_text())

    proc = run_cli(overrides, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _archive(run_dir) == _archive(smoke_run[0])


@pytest.mark.slow
def test_sigint_outside_an_evaluation_stops_at_once(tmp_path):
    proc = _start(SMOKE, tmp_path)
    seen = _lines_until(proc, lambda line: "data:" in line)  # proxy build / loading: nothing to finish
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, rest[-3000:]
    stderr = "".join(seen) + rest
    assert "stopped by SIGINT" in stderr and "Continue with:" in stderr and "Traceback" not in stderr
    (run_dir,) = run_dirs(tmp_path)
    assert (run_dir / "config.yaml").is_file() and not (run_dir / "archive.jsonl").exists()


@pytest.mark.slow
def test_a_run_stopped_in_its_finalize_stage_is_continued_there(tmp_path, monkeypatch, capfd):
    """SIGINT while the finalize stage exports its second model: the run is unfinished (summary.json
    says `finalize_pending`), and rerunning the command with resume=auto continues it rather than
    starting a new run: no search again, the finished model kept, the others written, half-written
    model folders removed."""
    from amq.finalize.stage import Finalizer
    from amq.run.interrupts import Interrupted
    from amq.run.resume import finished

    args = [o for o in REFERENCE if o != "finalize.enabled=false"] + ["finalize.extra_front_points=0", "finalize.evaluate=false", "finalize.formats=[]"]
    export = Finalizer.export

    def stopped_at_the_second(self, target, cand):
        if (self.output_dir / "models").is_dir():
            raise Interrupted(signal.SIGINT)
        return export(self, target, cand)

    with monkeypatch.context() as m:
        m.setattr(Finalizer, "export", stopped_at_the_second)
        proc = run_cli_in_process(args, tmp_path, monkeypatch, capfd)
    assert proc.returncode == 130, proc.stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path)
    assert json.loads((run_dir / "summary.json").read_text())["finalize_pending"] is True
    assert [p.name for p in (run_dir / "models").iterdir()] == ["4"] and "Continue with:" in proc.stderr
    (run_dir / "models" / ".4.5.k1ll3d.tmp").mkdir()  # what a SIGKILL in the middle of writing a model leaves
    archived = (run_dir / "archive.jsonl").read_text()
    first = {p.name: p.stat().st_mtime_ns for p in (run_dir / "models" / "4").iterdir()}

    proc = run_cli_in_process([*args, "resume=auto"], tmp_path, monkeypatch, capfd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run_dirs(tmp_path) == [run_dir] and f"resume=auto: continuing {run_dir}" in proc.stderr
    assert "its search is complete" in proc.stderr and "iteration 0/" not in proc.stderr
    assert (run_dir / "archive.jsonl").read_text() == archived
    # the model the stopped process finished is kept, not quantized and written again
    assert "models/4: finished by the stopped run for this configuration and settings, kept" in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "models" / "4").iterdir()} == first
    assert "models/4.5: finished" not in proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "finalize_pending" not in summary and sorted(summary["finalize"]["models"]) == ["4", "4.5", "5"]
    assert sorted(p.name for p in (run_dir / "models").iterdir()) == ["4", "4.5", "5"] and finished(run_dir)
