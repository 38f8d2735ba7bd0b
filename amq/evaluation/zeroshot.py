"""Zero- and few-shot accuracy of an in-memory model through lm-eval.

`finalize.tasks` takes any task, group or tag lm-eval's TaskManager knows (`lm-eval ls tasks`),
plus the offline BIG-bench tasks amq builds from PyPI (amq.evaluation.bigbench). The model object
is handed to lm-eval's HFLM as is (it may hold custom packed linear modules): nothing is moved,
cast or re-loaded from a path. All tasks run in one `simple_evaluate` call; its results dict is
kept, made JSON-serialisable as lm-eval's own writer does, next to amq's rows.

A task from the hub needs its dataset. With the hub reachable, `prepare_zero_shot` loads every
task while the settings are checked (so `datasets` fetches and caches them before any model
loads); offline, HF_DATASETS_OFFLINE=1 reads `datasets`' cache, and a task whose dataset is not
there fails at that check in one line instead of after the search.
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from amq.errors import ConfigError
from amq.evaluation.bigbench import OFFLINE_TASKS, PreparedTask, chance_accuracy, prepare_tasks
from amq.evaluation.task_index import task_manager
from amq.hub import hub_reachable, offline_mode
from amq.io import atomic_write_text

if TYPE_CHECKING:  # transformers and lm-eval are slow to import: settings errors come before them
    from lm_eval.tasks import TaskManager
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

LM_EVAL_RESULTS = "lm_eval_results.json"  # lm-eval's results dict, next to amq's eval.json
VALID_TASKS = f"any task, group or tag lm-eval knows (`lm-eval ls tasks`), or the offline BIG-bench tasks {', '.join(OFFLINE_TASKS)}"
OFFLINE_HELP = (
    f"the offline tasks {', '.join(OFFLINE_TASKS)}; or run once with network so `datasets` caches the task's dataset, "
    "then HF_DATASETS_OFFLINE=1 reads it offline"
)
# HFLM warns that many of its arguments are ignored for a model object; here that is the point.
_EXPECTED_WARNINGS = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model")


class _DropExpected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_EXPECTED_WARNINGS)


def _quiet_lm_eval() -> None:
    """lm-eval and datasets at WARNING, minus HFLM's two warnings about being given an object."""
    for name in ("lm_eval", "lm-eval", "datasets"):
        logging.getLogger(name).setLevel(logging.WARNING)
    hf_log = logging.getLogger("lm_eval.models.huggingface")
    if not any(isinstance(f, _DropExpected) for f in hf_log.filters):
        hf_log.addFilter(_DropExpected())
    import datasets

    datasets.disable_progress_bars()


def _count(value: Any, setting: str, low: int, valid: str) -> int:
    """`value` as an integer >= `low` (booleans are not counts), else a ConfigError naming `setting`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(setting, f"{value!r}", valid)
    return value


@dataclass(frozen=True)
class TaskSettings:
    """What lm-eval runs: task names, documents per task, few-shot examples, batch size, seed.

    `num_fewshot`: None keeps each task's own default (lm-eval's config; 0 where it sets none), an
    integer applies to every task, a mapping {task: n} to the tasks it names (a group's or tag's n
    to all of its tasks; the others keep their default).
    """

    tasks: tuple[str, ...] = ()
    limit: int | None = None
    num_fewshot: int | Mapping[str, int] | None = None
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str) or not all(isinstance(t, str) and t.strip() for t in self.tasks):
            raise ConfigError("finalize.tasks", f"expected a list of task names, got {self.tasks!r}", VALID_TASKS)
        if len(set(self.tasks)) < len(self.tasks):
            raise ConfigError("finalize.tasks", f"{list(self.tasks)} names a task twice", "each task once")
        if self.limit is not None:
            _count(self.limit, "finalize.task_limit", 1, "a positive number of documents, or null for every document")
        _count(self.batch_size, "finalize.task_batch_size", 1, "a positive integer")
        shots = self.num_fewshot
        valid = "null (each task's default), an integer >= 0 for every task, or {task: n} for the tasks named, e.g. {arc_challenge: 25}"
        if isinstance(shots, Mapping):
            strays = [t for t in shots if t not in self.tasks]
            if strays:
                raise ConfigError("finalize.num_fewshot", f"names {', '.join(map(repr, strays))}, not in finalize.tasks {list(self.tasks)}", valid)
            for task, n in shots.items():
                _count(n, f"finalize.num_fewshot.{task}", 0, valid)
        elif shots is not None:
            _count(shots, "finalize.num_fewshot", 0, valid)

    def fewshot(self, name: str) -> int | None:
        """The number of examples asked for `name` (None: the task's own default)."""
        if isinstance(self.num_fewshot, Mapping):
            return self.num_fewshot.get(name)
        return self.num_fewshot

    def describe(self) -> dict:
        shots = dict(self.num_fewshot) if isinstance(self.num_fewshot, Mapping) else self.num_fewshot
        return {"tasks": list(self.tasks), "task_limit": self.limit, "num_fewshot": shots, "task_batch_size": self.batch_size}


@dataclass
class TaskResults:
    """amq's row per task (metrics, documents, shots, source) and lm-eval's own results dict."""

    rows: dict[str, dict]
    lm_eval: dict = field(repr=False)


def _hub_tasks(tasks: Sequence[str]) -> list[str]:
    return [t for t in tasks if t not in OFFLINE_TASKS]


def _check_names(tasks: Sequence[str], manager: TaskManager) -> None:
    unknown = [t for t in _hub_tasks(tasks) if t not in manager.task_index]
    if unknown:
        hints = difflib.get_close_matches(unknown[0], [*manager.all_tasks, *OFFLINE_TASKS], n=3)
        hint = f"; did you mean {', '.join(hints)}?" if hints else ""
        raise ConfigError("finalize.tasks", f"unknown task {', '.join(map(repr, unknown))}{hint}", VALID_TASKS)


def _dataset_of(name: str, manager: TaskManager) -> str:
    """' (dataset <path>)' for a task whose config names its dataset, else ''."""
    entry = manager.task_index.get(name)
    path = (entry.cfg or {}).get("dataset_path") if entry is not None else None
    return f" (dataset {path})" if path else ""


def _check_hub(tasks: Sequence[str], manager: TaskManager) -> None:
    """Hub tasks with the hub unreachable and no offline cache asked for: one line, no retries."""
    hub = _hub_tasks(tasks)
    if hub and not offline_mode("dataset") and not hub_reachable():
        named = ", ".join(t + _dataset_of(t, manager) for t in hub)
        raise ConfigError("finalize.tasks", f"{named} need(s) the Hugging Face dataset hub, which is unreachable from here", OFFLINE_HELP)


def _load(manager: TaskManager, settings: TaskSettings) -> tuple[list[Any], dict[str, list[str]]]:
    """Build every task (lm-eval loads its dataset here) with its few-shot count set.

    Returns what simple_evaluate takes (a group as one object, so its aggregate is reported) and
    each configured name's leaf tasks."""
    objects: list[Any] = []
    members: dict[str, list[str]] = {}
    for name in settings.tasks:
        try:
            loaded = manager.load([name])
        except Exception as exc:  # datasets raises many types for "not available"
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}" if str(exc) else type(exc).__name__
            cache = "; HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set and `datasets`' cache does not hold it" if offline_mode("dataset") else ""
            raise ConfigError("finalize.tasks", f"cannot load task {name}{_dataset_of(name, manager)} ({reason}){cache}", OFFLINE_HELP) from None
        members[name] = list(loaded["tasks"])
        shots = settings.fewshot(name)
        if shots is not None:
            for task_name, task in loaded["tasks"].items():
                if shots > 0 and task.get_config("num_fewshot") == 0:  # lm-eval's own rule for --num_fewshot
                    log.warning("zero-shot %s: its lm-eval config fixes num_fewshot at 0; it runs without examples", task_name)
                else:
                    task.set_config(key="num_fewshot", value=shots)
        group = loaded.get("groups", {}).get(name)
        objects.extend([group] if group is not None else loaded["tasks"].values())
    return objects, members


def prepare_zero_shot(tasks: Sequence[str], cache_dir: str | Path, num_fewshot: int | Mapping[str, int] | None = None) -> None:
    """Check the tasks and make them ready now: offline ones converted, hub ones loaded (their
    datasets fetched into `datasets`' cache, or found there offline).

    Called before the minutes of work that precede zero-shot scoring (model loading, a search), so
    a bad name, an unreachable hub or a dataset missing from the cache fails at once."""
    if isinstance(tasks, str):
        raise ConfigError("finalize.tasks", f"expected a list of task names, got {tasks!r}", VALID_TASKS)
    settings = TaskSettings(tuple(tasks), num_fewshot=num_fewshot)
    if not settings.tasks:
        raise ConfigError("finalize.tasks", "expected a non-empty list of task names, got []", VALID_TASKS)
    offline = prepare_tasks([t for t in settings.tasks if t in OFFLINE_TASKS], cache_dir)
    if not _hub_tasks(settings.tasks):
        return
    _quiet_lm_eval()
    t0 = time.perf_counter()
    manager = task_manager(settings.tasks, offline, cache_dir)
    _check_names(settings.tasks, manager)
    _check_hub(settings.tasks, manager)
    _load(manager, settings)
    log.info("zero-shot tasks %s ready in %.0fs", ", ".join(settings.tasks), time.perf_counter() - t0)


def _hflm(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int, add_bos_token: bool | None):
    """HFLM over the model object, without tqdm bars (lm-eval does not pass its switch through)."""
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

    # HFLM sets a pad token on the tokenizer it is given: hand it a copy, not the caller's.
    return QuietHFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size, add_bos_token=add_bos_token)


def lm_eval_json(results: dict) -> str:
    """lm-eval's results dict as its own writer dumps it (EvaluationTracker.save_results_aggregated)."""
    from lm_eval.utils import handle_non_serializable

    return json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)


def write_lm_eval_results(path: str | Path, results: dict) -> None:
    """Write lm-eval's results dict (atomically) as lm-eval's CLI would."""
    atomic_write_text(path, lm_eval_json(results) + "\n")


def _metrics(values: Mapping[str, Any]) -> dict[str, float | None]:
    """lm-eval's `metric,filter` entries as {metric: value} (`metric,filter` for filters other than
    none); a stderr lm-eval could not compute ("N/A") is None."""
    out: dict[str, float | None] = {}
    for key, value in values.items():
        metric, sep, filt = key.partition(",")
        if not sep:
            continue  # alias, name
        finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        out[metric if filt == "none" else key] = float(value) if finite else None
    return out


def _row(name: str, leaves: Sequence[str], results: dict, limit: int | None, prepared: PreparedTask | None) -> dict:
    """amq's row for one reported name: its metrics, documents scored, examples shown, source."""
    n = sum(int(results["n-samples"][t]["effective"]) for t in leaves if t in results["n-samples"])
    shots = {results["n-shot"][t] for t in leaves if t in results.get("n-shot", {})}
    row: dict[str, Any] = {**_metrics(results["results"][name]), "n": n, "limit": limit, "num_fewshot": shots.pop() if len(shots) == 1 else None}
    if prepared is not None:
        row["source"] = prepared.source
        row["chance"] = chance_accuracy(prepared.docs()[:n])
    else:
        version = results.get("versions", {}).get(name)
        row["source"] = f"lm-eval {name}" + (f" v{version}" if version is not None else "")
    return row


@dataclass
class TaskRunner:
    """Runs one set of task settings on any number of models, building lm-eval's task index once
    (over its built-in tasks it takes seconds) and amq's offline tasks once."""

    settings: TaskSettings
    cache_dir: Path
    _offline: dict[str, PreparedTask] = field(default_factory=dict, repr=False)
    _manager: TaskManager | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.settings.tasks:
            raise ConfigError("finalize.tasks", "expected a non-empty list of task names, got []", VALID_TASKS)

    def manager(self) -> TaskManager:
        if self._manager is None:
            names = self.settings.tasks
            self._offline = {t.name: t for t in prepare_tasks([t for t in names if t in OFFLINE_TASKS], self.cache_dir)}
            self._manager = task_manager(names, list(self._offline.values()), self.cache_dir)
            if _hub_tasks(names):
                _check_names(names, self._manager)
        return self._manager

    def run(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, add_bos_token: bool | None = None) -> TaskResults:
        """All tasks in one lm-eval pass; amq's rows and lm-eval's serialisable results.

        `add_bos_token` None follows the tokenizer's default; models that need BOS at the start of
        every sequence pass True. Each row holds every metric lm-eval reports for the task (a group:
        its aggregate), `n` documents, `limit`, `num_fewshot` as run, its `source`, and for the
        offline tasks `chance`, the expected accuracy of a uniform guess on those documents.
        """
        _quiet_lm_eval()
        import lm_eval

        settings, manager = self.settings, self.manager()
        _check_hub(settings.tasks, manager)
        objects, members = _load(manager, settings)
        lm = _hflm(model, tokenizer, settings.batch_size, add_bos_token)
        t0 = time.perf_counter()
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=objects,
            task_manager=manager,
            limit=settings.limit,
            batch_size=settings.batch_size,
            log_samples=False,
            random_seed=settings.seed,
            numpy_random_seed=settings.seed,
            torch_random_seed=settings.seed,
            fewshot_random_seed=settings.seed,
        )
        results = json.loads(lm_eval_json(out))
        rows: dict[str, dict] = {}
        for name in settings.tasks:  # a task or group: its own row; a tag (no aggregate): a row per task
            for reported in [name] if name in results["results"] else members[name]:
                leaves = members[name] if reported == name else [reported]
                rows[reported] = _row(reported, leaves, results, settings.limit, self._offline.get(reported))
        for task, row in rows.items():
            shown = ", ".join(f"{k} {row[k]:.4f}" for k in ("acc", "acc_norm") if row.get(k) is not None) or f"metrics in {LM_EVAL_RESULTS}"
            log.info("zero-shot %s: %s on %d documents, %s-shot (%s)", task, shown, row["n"], row["num_fewshot"], row["source"])
        log.info("lm-eval: %d task(s) in %.0fs", len(rows), time.perf_counter() - t0)
        return TaskResults(rows, results)


def zero_shot(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str],
    cache_dir: str | Path,
    limit: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    add_bos_token: bool | None = None,
    num_fewshot: int | Mapping[str, int] | None = None,
) -> dict[str, dict]:
    """amq's rows of `TaskRunner.run` (see there) for these tasks and settings."""
    if isinstance(tasks, str):
        raise ConfigError("finalize.tasks", f"expected a list of task names, got {tasks!r}", VALID_TASKS)
    settings = TaskSettings(tuple(tasks), limit, num_fewshot, batch_size, seed)
    return TaskRunner(settings, Path(cache_dir)).run(model, tokenizer, add_bos_token).rows
