"""Zero-shot accuracy of an in-memory model through lm-eval.

The model object is handed to lm-eval's HFLM as is (it may hold custom packed linear modules):
nothing is moved, cast or re-loaded from a path. Offline BIG-bench tasks (amq.evaluation.bigbench)
always work; the standard lm-eval task names need the dataset hub and fail fast without it.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from amq.errors import ConfigError
from amq.evaluation.bigbench import OFFLINE_TASKS, chance_accuracy, prepare_tasks
from amq.hub import hub_reachable, offline_mode

log = logging.getLogger(__name__)

# lm-eval task names passed through for users whose machine reaches the dataset hub.
STANDARD_TASKS = ("piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge", "lambada_openai", "boolq")
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


def check_tasks(tasks: Sequence[str]) -> None:
    """Unknown names, and standard names with the dataset hub unreachable, are ConfigErrors."""
    valid = f"offline: {', '.join(OFFLINE_TASKS)}; with network: {', '.join(STANDARD_TASKS)}"
    if isinstance(tasks, str) or not tasks:
        raise ConfigError("finalize.tasks", f"expected a non-empty list of task names, got {tasks!r}", valid)
    unknown = [t for t in tasks if t not in OFFLINE_TASKS and t not in STANDARD_TASKS]
    if unknown:
        raise ConfigError("finalize.tasks", f"unknown zero-shot task {', '.join(map(repr, unknown))}", valid)
    hub = [t for t in tasks if t in STANDARD_TASKS]
    if hub and not offline_mode("dataset") and not hub_reachable():
        raise ConfigError(
            "finalize.tasks",
            f"{', '.join(hub)} need(s) the Hugging Face dataset hub, which is unreachable from here",
            f"the offline tasks {', '.join(OFFLINE_TASKS)}, or HF_DATASETS_OFFLINE=1 to use copies cached earlier",
        )


def prepare_zero_shot(tasks: Sequence[str], cache_dir: str | Path) -> None:
    """Check the task names and fetch/convert the offline ones now.

    Called before the minutes of work that precede zero-shot scoring (a search, perplexity), so a
    bad name, an unreachable hub or a missing BIG-bench cache without downloads fails at once.
    """
    check_tasks(tasks)
    prepare_tasks([t for t in tasks if t in OFFLINE_TASKS], cache_dir)


def _hflm(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int, add_bos_token: bool | None):
    """HFLM over the model object, without tqdm bars (lm-eval does not pass its switch through)."""
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

    # HFLM sets a pad token on the tokenizer it is given: hand it a copy, not the caller's.
    return QuietHFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size, add_bos_token=add_bos_token)


def _metric(values: dict[str, Any], name: str) -> float | None:
    v = values.get(f"{name},none")
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def zero_shot(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str],
    cache_dir: Path,
    limit: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    add_bos_token: bool | None = None,
) -> dict[str, dict]:
    """Zero-shot accuracy per task: {acc, acc_stderr, acc_norm?, acc_norm_stderr?, n, limit, source[, chance]}.

    `limit` keeps the first `limit` documents of each task (None: all). `add_bos_token` None follows
    the tokenizer's default; models that need BOS at the start of every sequence pass True.
    `chance` (offline tasks) is the expected accuracy of a uniform guess on the documents scored.
    """
    check_tasks(tasks)
    if limit is not None and limit < 1:
        raise ConfigError("finalize.task_limit", f"{limit} documents", "a positive number, or None for every document")
    if batch_size < 1:
        raise ConfigError("batch_size", f"{batch_size}", "a positive integer")
    _quiet_lm_eval()
    import lm_eval
    from lm_eval.tasks import TaskManager

    offline = prepare_tasks([t for t in tasks if t in OFFLINE_TASKS], cache_dir)
    # The built-in task index is only scanned when a standard task is asked for.
    manager = TaskManager(include_path=[str(t.directory) for t in offline] or None, include_defaults=any(t in STANDARD_TASKS for t in tasks))
    lm = _hflm(model, tokenizer, batch_size, add_bos_token)
    by_name = {t.name: t for t in offline}
    results: dict[str, dict] = {}
    for task in tasks:
        t0 = time.perf_counter()
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=[task],
            task_manager=manager,
            limit=limit,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
        values, n = out["results"][task], int(out["n-samples"][task]["effective"])
        row: dict[str, Any] = {"acc": _metric(values, "acc"), "acc_stderr": _metric(values, "acc_stderr")}
        if (norm := _metric(values, "acc_norm")) is not None:
            row.update(acc_norm=norm, acc_norm_stderr=_metric(values, "acc_norm_stderr"))
        row["n"], row["limit"] = n, limit
        if task in by_name:
            row["source"] = by_name[task].source
            row["chance"] = chance_accuracy(by_name[task].docs()[:n])
        else:
            row["source"] = f"lm-eval {task}"
        results[task] = row
        shown = [float("nan") if row.get(k) is None else row[k] for k in ("acc", "acc_stderr", "acc_norm")]
        log.info("zero-shot %s: acc %.4f +- %.4f, acc_norm %.4f on %d documents (%s) in %.0fs", task, *shown, n, row["source"], time.perf_counter() - t0)
    return results
