"""Continuing an interrupted run: which directory (`resume=<dir>` or `resume=auto`), whether it may
be continued, and the command that continues it.

A run directory can be continued when it holds an unfinished run whose settings equal the current
ones, except those that change how fast a run goes or where it reports, not what it finds
(`RESUME_MAY_DIFFER`). `budget.iterations` may grow, which extends a finished search. A run its
time limit stopped (`budget.max_minutes`, recorded as `stopped` in summary.json) is unfinished:
continued with a larger limit or none, it searches on from the next iteration.

A run killed or stopped in its finalize stage is unfinished too (`finalize_pending` in summary.json):
continued, it finds its search complete and runs the finalize stage again.

`resume=auto` makes a command safe to rerun as is (a preempted job, a requeue): it continues the
newest unfinished run with the same settings under the same runs folder, or starts a new one.

`amq.config.hydra_callback.RunDirCallback` (conf/hydra/default.yaml) applies this before Hydra creates or
writes anything: it points the run at the resumed directory, keeps the original run's `.hydra/`
record (what was asked for first), and refuses a bad `resume=` or an unwritable output folder with
one line and exit status 2.
"""

from __future__ import annotations

import json
import logging
import shlex
import tempfile
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from amq.errors import ConfigError
from amq.run.outputs import CONFIG_FILE, SUMMARY_FILE
from amq.run.run_lock import in_use
from amq.run.state import read_state

log = logging.getLogger(__name__)

TIME_LIMIT = "budget.max_minutes"
# Settings that may differ between an interrupted run and its continuation: where outputs and
# caches go, tracking, how often plots are redrawn, CPU threads, how the metric is batched (same
# values up to float rounding), and how long the search may take (where it stops, not what it finds).
RESUME_MAY_DIFFER = (
    "resume",
    "paths",
    "hydra",
    "task_name",
    "sweep_name",
    "num_threads",
    "plot_every_s",
    "logger",
    "eval_cache",
    "budget.iterations",
    TIME_LIMIT,
    "metric.compile",
    "metric.batch_size",
    "metric.chunk_tokens",
    "metric.prefix_cache_mb",
    "quantizer.storage",
    "data.cache_dir",
)
# Settings added after runs were saved without them: the behaviour such a run had. A run saved
# before `search.pruning.score` existed pruned on damage, so it resumes with score=damage; one
# saved before `search.target_slots` gave no slots to the targets; one saved before `search.confirm`
# ran no confirmation pass (its other keys then change nothing: their defaults).
ADDED_LATER: dict[str, Any] = {
    "search.pruning.score": "damage",
    "search.target_slots": 0.0,
    "search.confirm._target_": "amq.search.confirmation.ConfirmSettings",
    "search.confirm.samples": 0,
    "search.confirm.candidates": 3,
    "search.confirm.band": 0.02,
    "search.sensitivity_widths": "lowest",
    "search.predictor_prior": "none",
    "search.resolve_moves": False,
    "search.shrink_table": False,
    "metric.trim": 0.0,
    "finalizer.integer_zero": False,
    "quantizer.integer_zero": False,
}
HYDRA_OVERRIDES = Path(".hydra") / "overrides.yaml"
# summary.json key, true while the search has ended and its finalize stage has not: a run killed or
# stopped in the finalize stage is unfinished, and continuing it runs that stage again.
FINALIZE_PENDING = "finalize_pending"
VALID_DIR = "the directory of an unfinished amq-search run (outputs/search/runs/<time>), or auto"


def under(path: str, keys: tuple[str, ...]) -> bool:
    """Whether dotted `path` is one of `keys` or lies below one of them."""
    return any(path == k or path.startswith(k + ".") for k in keys)


def _may_differ(path: str) -> bool:
    return under(path, RESUME_MAY_DIFFER)


def comparable_settings(cfg: DictConfig) -> dict[str, Any]:
    """Every setting that decides a search's results, as {dotted key: resolved value}."""
    out: dict[str, Any] = {}

    def walk(node: DictConfig, prefix: str) -> None:
        for key in node:
            path = f"{prefix}{key}"
            if _may_differ(path):
                continue
            try:
                value = node[key]
            except Exception:  # a mandatory value left unset (???): compared as such
                value = "???"
            if isinstance(value, DictConfig):
                walk(value, path + ".")
            else:
                out[path] = OmegaConf.to_container(value, resolve=True) if isinstance(value, ListConfig) else value

    walk(cfg, "")
    return out


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    saved = {**{k: v for k, v in ADDED_LATER.items() if k not in saved and k in current}, **saved}
    keys = sorted(set(saved) | set(current))
    return [f"{k}={current.get(k)!r} (the run has {saved.get(k)!r})" for k in keys if saved.get(k) != current.get(k)]


def shown_differences(diff: list[str], most: int = 4) -> str:
    """The first `most` differences for a one-line message."""
    return "; ".join(diff[:most]) + (f"; and {len(diff) - most} more" if len(diff) > most else "")


def task_overrides(run_dir: Path) -> list[str] | None:
    """The command-line overrides a run was started with (Hydra's record), without `resume=`."""
    path = run_dir / HYDRA_OVERRIDES
    if not path.is_file():
        return None
    try:
        overrides = yaml.safe_load(path.read_text()) or []
    except yaml.YAMLError:
        return None
    return [str(o) for o in overrides if not str(o).lstrip("+~").startswith("resume=")]


def resume_command(run_dir: Path, overrides: list[str] | None = None) -> str:
    """The command line that continues `run_dir`."""
    overrides = task_overrides(run_dir) if overrides is None else overrides
    args = [*(overrides or []), f"resume={run_dir}"]
    return "amq-search " + " ".join(shlex.quote(a) for a in args)


def continue_past_time_limit(run_dir: Path) -> str:
    """The command that continues a run its time limit stopped: its own overrides and no limit."""
    kept = [o for o in task_overrides(run_dir) or [] if o.lstrip("+~").split("=", 1)[0] != TIME_LIMIT]
    return resume_command(run_dir, [*kept, f"{TIME_LIMIT}=null"])


def finished(run_dir: Path) -> bool:
    """Whether a run ended: it wrote summary.json, its time limit did not stop the search, and its
    finalize stage (where on) is done."""
    path = run_dir / SUMMARY_FILE
    if not path.is_file():
        return False
    try:
        summary = json.loads(path.read_text())
        return not summary.get("stopped") and not summary.get(FINALIZE_PENDING)
    except (OSError, ValueError, AttributeError):
        return True  # unreadable: not a run to continue on its own


def check_resumable(run_dir: Path, settings: dict[str, Any], iterations: int) -> None:
    """Raise ConfigError unless `run_dir` holds an unfinished run that a run with `settings`
    (`comparable_settings` of its config) and `iterations` search iterations may continue."""
    if not run_dir.is_dir():
        raise ConfigError("resume", f"{run_dir} is not a directory", VALID_DIR)
    config = run_dir / CONFIG_FILE
    if not config.is_file():
        raise ConfigError("resume", f"{run_dir} holds no amq-search run (no {CONFIG_FILE})", VALID_DIR)
    try:
        saved = comparable_settings(OmegaConf.load(config))
    except Exception as exc:  # any YAML or OmegaConf error: the file is damaged
        raise ConfigError("resume", f"{config} is damaged ({type(exc).__name__})", "restore it, or start a new run") from None
    diff = differences(saved, settings)
    if diff:
        raise ConfigError("resume", f"{run_dir} was searched with other settings: {shown_differences(diff)}", f"its own settings: {resume_command(run_dir)}")
    state = read_state(run_dir)
    if state is not None and finished(run_dir) and state.last_completed_iteration >= iterations:
        raise ConfigError(
            "resume",
            f"{run_dir} is already complete ({state.last_completed_iteration} iterations)",
            "a larger budget.iterations to search further, or resume=auto to start a new run",
        )


def find_unfinished(runs_dir: Path, settings: dict[str, Any], iterations: int) -> Path | None:
    """The newest run under `runs_dir` that a run with `settings` may continue (same settings, not finished)."""
    if not runs_dir.is_dir():
        return None
    for run_dir in sorted((p for p in runs_dir.iterdir() if p.is_dir()), key=lambda p: p.name, reverse=True):
        if finished(run_dir) or not (run_dir / CONFIG_FILE).is_file():
            continue  # finished, or stopped before it wrote anything (nothing to continue)
        try:
            check_resumable(run_dir, settings, iterations)
        except ConfigError:
            continue
        if in_use(run_dir):
            log.info("resume=auto: passing over %s, which another amq-search process is running", run_dir)
            continue
        return run_dir
    return None


def probe_writable(directory: Path, setting: str) -> None:
    """Create `directory` and a file in it, or raise ConfigError naming `setting`."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise ConfigError(
            setting,
            f"cannot write the run directory {directory} ({exc.strerror or exc})",
            "a writable folder: AMQ_OUTPUT_DIR=<dir> or paths.log_dir=<dir>",
        ) from None
