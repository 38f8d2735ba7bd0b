"""A wall-clock budget (`budget.max_minutes`): the search stops at an iteration boundary once the
next iteration would end past the limit, leaves a valid front, records the stop in summary.json,
and continues later (resume=<dir> or resume=auto, a larger limit or none) to the same archive as
a run that was never stopped.

The loop is driven by an injected clock that true evaluations advance, so nothing sleeps; one
end-to-end run shows the same through the command line.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import CONF, SMOKE, run_cli, run_cli_in_process, run_dirs, settings_yaml

from amq.config.check import check_settings
from amq.config.compose import resume_settings, search_deadline
from amq.errors import ConfigError
from amq.modeling.discovery import LinearInfo
from amq.run.resume import check_resumable, find_unfinished, finished
from amq.search.archive import Archive
from amq.search.evaluator import Evaluation, measured
from amq.search.loop import IterativeSearch, SearchSettings, duration_text
from amq.search.nsga import NSGA2Settings
from amq.search.space import SearchSpace

EVAL_SECONDS = 1.0  # what one true evaluation costs on the fake clock
SETTINGS = SearchSettings(n_initial_random=6, iterations=5, batch_size=4, nsga=NSGA2Settings(pop_size=12, n_gen=2))
STOPPED_AFTER_2 = {"reason": "max_minutes", "after_iteration": 2, "of": SETTINGS.iterations}


class FakeClock:
    """A monotonic clock that only true evaluations move."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class LogLinear:
    """A cheap, deterministic predictor: least squares on log(metric)."""

    name = "loglinear"

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def fit(self, X: np.ndarray, y: np.ndarray) -> "LogLinear":
        self.w = np.linalg.lstsq(np.c_[X, np.ones(len(X))], np.log(y), rcond=None)[0]
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.exp(np.c_[X, np.ones(len(X))] @ self.w)


def _space() -> SearchSpace:
    lin = [LinearInfo(f"model.layers.{b}.l{i}", b, f"l{i}", 64, 64 * (1 + i)) for b in range(6) for i in range(3)]
    return SearchSpace(lin, [3, 4, 8], 64)


def _search(space: SearchSpace, archive: Archive, clock: FakeClock, deadline: float | None) -> IterativeSearch:
    damage = np.random.default_rng(0).lognormal(-6, 1.0, space.n_genes)

    def evaluate(genes: np.ndarray) -> Evaluation:  # additive damage stands in for the true metric
        clock.now += EVAL_SECONDS
        return measured(float((damage * 4.0 ** -space.gene_bits(genes)[0].astype(float)).sum()), EVAL_SECONDS, "jsd")

    return IterativeSearch(space, evaluate, LogLinear, SETTINGS, archive, "jsd", [4.0, 5.0], seed=1, deadline=deadline, clock=clock)


def _records(archive: Archive) -> list[tuple]:
    return [(archive.space.key(r.genes), r.metric, r.iteration) for r in archive.records]


def _uninterrupted(space: SearchSpace) -> tuple[list[tuple], list[dict]]:
    archive = Archive(space)
    rows = _search(space, archive, FakeClock(), None).run()
    return _records(archive), rows


def _deadline_after_2(rows: list[dict]) -> float:
    """Half a second before iteration 3 of these rows would end: the loop must stop after iteration 2."""
    secs = [r["search/iteration_seconds"] for r in rows]
    return sum(secs[:3]) + secs[2] - 0.5


# ---------------------------------------------------------------------------- the loop
def test_stops_at_the_iteration_boundary_before_the_next_would_end_past_the_deadline():
    space, clock = _space(), FakeClock()
    reference, ref_rows = _uninterrupted(space)
    ends = np.cumsum([r["search/iteration_seconds"] for r in ref_rows])
    deadline = _deadline_after_2(ref_rows)
    archive = Archive(space)
    search = _search(space, archive, clock, deadline)
    rows = search.run()

    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert search.stopped == STOPPED_AFTER_2
    assert clock.now == ends[2] <= deadline  # the last iteration started before the deadline and was finished
    assert _records(archive) == reference[: len(archive)] and max(r.iteration for r in archive.records) == 2


def test_iteration_zero_always_runs_and_a_spent_limit_runs_nothing_more():
    space, clock = _space(), FakeClock()
    archive = Archive(space)
    search = _search(space, archive, clock, deadline=-1.0)
    assert [r["iteration"] for r in search.run()] == [0]  # there is a front to return
    assert search.stopped == {"reason": "max_minutes", "after_iteration": 0, "of": SETTINGS.iterations}
    n = len(archive)
    assert search.run(start_iteration=1) == [] and len(archive) == n  # continued with the limit already spent
    assert search.stopped["after_iteration"] == 0


def test_a_run_to_its_end_records_no_stop():
    space = _space()
    search = _search(space, Archive(space), FakeClock(), deadline=1e9)
    assert len(search.run()) == SETTINGS.iterations + 1 and search.stopped is None


def test_continued_with_no_limit_it_reaches_the_uninterrupted_archive(tmp_path):
    space = _space()
    reference, ref_rows = _uninterrupted(space)
    path = tmp_path / "archive.jsonl"
    stopped = _search(space, Archive(space, path), FakeClock(), _deadline_after_2(ref_rows))
    stopped.run()
    assert stopped.stopped == STOPPED_AFTER_2

    archive = Archive(space, path)  # a new process: the archive file is all it has
    archive.load("jsd")
    rows = _search(space, archive, FakeClock(), None).run(start_iteration=3)
    assert [r["iteration"] for r in rows] == [3, 4, 5]
    assert _records(archive) == reference
    assert [r["hypervolume"] for r in rows] == [r["hypervolume"] for r in ref_rows[3:]]


def test_progress_lines_give_the_time_left(caplog):
    space = _space()
    caplog.set_level(logging.INFO, logger="amq.search.loop")
    _uninterrupted(space)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("iteration ")]
    assert len(lines) == SETTINGS.iterations + 1
    secs = [float(re.search(r"\[([\d.]+)s", line).group(1)) for line in lines]
    # iteration 1: its own time x 4 iterations left (the larger initial design is left out of the mean)
    assert lines[1].endswith(f"[{secs[1]:.1f}s, ~{duration_text(secs[1] * 4)} left]"), lines[1]
    assert lines[-1].endswith(f"[{secs[-1]:.1f}s]"), lines[-1]

    caplog.clear()
    _search(space, Archive(space), FakeClock(), deadline=secs[0] + 2.0).run()  # 2 s after iteration 0: capped
    assert "[%.1fs, ~2s left to the time limit]" % secs[0] in caplog.records[0].getMessage()


def test_duration_text():
    assert [duration_text(s) for s in (0.4, 45, 100, 3599, 7500)] == ["0s", "45s", "1m40s", "59m59s", "2h05m"]


# ---------------------------------------------------------------------------- the setting
@pytest.mark.parametrize("value, minutes", [("2", 2.0), ("0.5", 0.5), ("null", None)])
def test_valid_limits_pass_the_settings_check(compose_cfg, value, minutes):
    cfg = compose_cfg([f"budget.max_minutes={value}"])
    check_settings(cfg, CONF)
    deadline = search_deadline(cfg.budget.max_minutes, started=100.0)
    assert deadline == (None if minutes is None else 100.0 + 60 * minutes)


@pytest.mark.parametrize("value", ["0", "-1", "abc", "true", "nan"])
def test_invalid_limits_are_config_errors(compose_cfg, value):
    cfg = compose_cfg([f"budget.max_minutes={value}"])
    with pytest.raises(ConfigError) as info:
        check_settings(cfg, CONF)
        search_deadline(cfg.budget.max_minutes, started=0.0)
    assert info.value.setting == "budget.max_minutes" and info.value.exit_code == 2 and "(valid: " in str(info.value)


# ---------------------------------------------------------------------------- resume
def _run_dir(runs: Path, compose_cfg, overrides: list[str], last_completed: int, summary: dict | None) -> Path:
    """A run directory under `runs` with these settings, its checkpoint, and summary.json (None: not written)."""
    cfg = compose_cfg([*SMOKE, *overrides])
    run_dir = runs / "2025-01-01_00-00-00"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(settings_yaml(cfg))
    (run_dir / "state.json").write_text(json.dumps({"space_fingerprint": "x", "last_completed_iteration": last_completed}))
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def test_a_run_its_limit_stopped_is_unfinished_and_may_continue_with_another_limit(compose_cfg, tmp_path):
    stopped = {"reason": "max_minutes", "after_iteration": 0, "of": 2}
    run_dir = _run_dir(tmp_path / "runs", compose_cfg, ["budget.max_minutes=0.001"], 0, {"stopped": stopped})
    assert not finished(run_dir)
    for limit in ("null", "30"):
        cfg = compose_cfg([*SMOKE, f"budget.max_minutes={limit}"])
        check_resumable(run_dir, *resume_settings(cfg)[1:])
        assert find_unfinished(tmp_path / "runs", *resume_settings(cfg)[1:]) == run_dir


def test_a_finished_run_is_not_continued_by_auto_but_may_be_extended(compose_cfg, tmp_path):
    run_dir = _run_dir(tmp_path / "runs", compose_cfg, [], 2, {"stopped": None})
    assert finished(run_dir)
    assert find_unfinished(tmp_path / "runs", *resume_settings(compose_cfg(SMOKE))[1:]) is None
    with pytest.raises(ConfigError, match="already complete"):
        check_resumable(run_dir, *resume_settings(compose_cfg(SMOKE))[1:])
    check_resumable(run_dir, *resume_settings(compose_cfg([*SMOKE, "budget.iterations=4"]))[1:])  # a larger budget extends it


# ---------------------------------------------------------------------------- end to end
def _archive(run_dir: Path) -> list[tuple]:
    return [(tuple(d["genes"]), d["metrics"]["jsd"], d["iteration"]) for d in map(json.loads, (run_dir / "archive.jsonl").read_text().splitlines())]


@pytest.mark.slow
def test_cli_stops_on_its_limit_then_resume_auto_reaches_the_uninterrupted_archive(smoke_run, tmp_path, monkeypatch, capfd, caplog):
    # 0.001 minutes are spent before iteration 0 ends (loading alone takes longer): it stops right after it.
    # The stop runs the CLI's entry point in this process; the resume, as a requeued job would, in a new one.
    proc = run_cli_in_process([*SMOKE, "seed=3", "budget.max_minutes=0.001"], tmp_path, monkeypatch, capfd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped"] == {"reason": "max_minutes", "after_iteration": 0, "of": 2}
    assert summary["seconds"]["total"] > 0
    front = json.loads((run_dir / "front.json").read_text())["front"]
    assert front and all(r["iteration"] == 0 for r in front)
    assert (run_dir / "front.csv").is_file() and (run_dir / "front.png").is_file()
    assert [json.loads(line)["iteration"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [0]
    (line,) = [x for x in proc.stderr.splitlines() if "stopped on its time limit" in x]
    assert "budget.max_minutes=0.001, counted from this run's start) after iteration 0 of 2" in line
    command = line.split(": ")[-1]
    assert command.startswith("amq-search ") and command.endswith(f" budget.max_minutes=null resume={run_dir}"), command
    assert "budget.max_minutes=0.001" not in command

    # the printed settings with resume=auto (what a requeued job script reruns): continues in place
    overrides = [o for o in command.split()[1:] if not o.startswith("resume=")]
    _refused_while_another_process_runs_it(run_dir, overrides, tmp_path, monkeypatch, capfd, caplog)
    proc = run_cli([*overrides, "resume=auto"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run_dirs(tmp_path) == [run_dir] and f"resume=auto: continuing {run_dir}" in proc.stderr
    assert re.search(r"iteration 1/2: .*\[\d+\.\ds, ~\d+s left\]", proc.stderr), proc.stderr[-3000:]
    assert _archive(run_dir) == _archive(smoke_run[0])
    assert json.loads((run_dir / "summary.json").read_text())["stopped"] is None
    assert json.loads((run_dir / "front.json").read_text()) == json.loads((smoke_run[0] / "front.json").read_text())


def _refused_while_another_process_runs_it(run_dir: Path, overrides: list[str], tmp_path: Path, monkeypatch, capfd, caplog) -> None:
    """While a process holds the run (the lock a running search holds, taken here), resume=auto passes
    it over and resume=<dir> is one line, exit 2, nothing touched; released, it is continuable again."""
    from amq.config.compose import compose_config
    from amq.run.run_lock import RunLock, in_use

    _, settings, iterations = resume_settings(compose_config(overrides))
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        with caplog.at_level("INFO", logger="amq.run.resume"):
            assert in_use(run_dir) and find_unfinished(run_dir.parent, settings, iterations) is None
        assert f"passing over {run_dir}, which another amq-search process is running" in caplog.text
        proc = run_cli_in_process([*overrides, f"resume={run_dir}"], tmp_path, monkeypatch, capfd)
        assert proc.returncode == 2, proc.stderr[-3000:]
        (error,) = [line for line in proc.stderr.splitlines() if "[ERROR]" in line]
        assert error.split("] - ", 1)[1].startswith(f"resume: {run_dir} is in use: another amq-search process") and "(valid: " in error
    finally:
        lock.release()
    assert not in_use(run_dir) and find_unfinished(run_dir.parent, settings, iterations) == run_dir
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before and run_dirs(tmp_path) == [run_dir]


@pytest.mark.slow
def test_cli_refuses_a_bad_limit_before_anything_runs(tmp_path, monkeypatch, capfd):
    proc = run_cli_in_process([*SMOKE, "budget.max_minutes=0"], tmp_path, monkeypatch, capfd)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (error,) = [line for line in proc.stderr.splitlines() if "[ERROR]" in line]
    assert error.split("] - ", 1)[1].startswith("budget.max_minutes: 0 (valid: ") and "Traceback" not in proc.stderr
    assert run_dirs(tmp_path) == []


def test_a_filesystem_without_flock_runs_the_search_unguarded(tmp_path, monkeypatch, caplog):
    """Some network mounts refuse flock (ENOLCK): the run goes on, saying that nothing keeps a
    second process out, rather than failing; and no run there counts as in use."""
    import errno

    from amq.run import run_lock

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "flock", no_locks)
    lock = run_lock.RunLock(tmp_path / "run")
    with caplog.at_level("WARNING", logger="amq.run.run_lock"):
        lock.acquire()
    assert "(No locks available): nothing keeps a second process out of this run" in caplog.text
    assert not run_lock.in_use(tmp_path / "run")
    lock.release()
