"""Offline zero-shot tasks built from the BIG-bench source package, for lm-eval.

The dataset hubs are unreachable here, but PyPI is not: the `bigbench==1.0.0` source package
(about 358 MB) carries the real task files. It is fetched once per machine with
`pip download` into `<cache_dir>/bigbench/` (or read from `AMQ_BIGBENCH_SDIST`), the task.json
files of the tasks below are converted to JSON lines plus an lm-eval task YAML each, and nothing
of it enters the repository (the files carry BIG-bench's do-not-train canary).

Prompts use BIG-bench's own prefixes (task prefix, input prefix, output prefix) in lm-eval's
cloze style (the choices are not listed in the prompt), and each choice is scored as the
continuation, as BIG-bench's multiple_choice_grade does. BIG-bench has no training split: with
`finalize.num_fewshot`, the examples are drawn (seeded) from the task's other documents, never the
one being scored, as BIG-bench's own few-shot mode does. Set `AMQ_OFFLINE=1` to forbid the download
(then a missing package is an error that says how to fetch it by hand).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import yaml

from amq.errors import ConfigError
from amq.io import atomic_write_text, file_lock, file_sha256, write_jsonl

log = logging.getLogger(__name__)

VERSION = "1.0.0"
SDIST = f"bigbench-{VERSION}.tar.gz"
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
SDIST_ENV = "AMQ_BIGBENCH_SDIST"
OFFLINE_ENV = "AMQ_OFFLINE"
# Bump when the conversion below changes, so caches built by an older one are not reused.
FORMAT = "lm_eval-v3"

# Offline task name -> BIG-bench task directory: multiple-choice tasks with short prompts, so a
# full pass costs seconds to minutes on CPU. At 135M only social_iqa scores clearly above chance
# (docs/benchmarks.md); the others are there for larger models.
OFFLINE_TASKS: dict[str, str] = {
    "bigbench_social_iqa": "social_iqa",  # 1,935 docs, 2-3 choices: social commonsense
    "bigbench_riddle_sense": "riddle_sense",  # 49 docs, 5 choices: commonsense riddles
    "bigbench_strategyqa": "strategyqa",  # 2,289 docs, yes/no: implicit multi-step reasoning
    "bigbench_general_knowledge": "general_knowledge",  # 70 docs, 4-13 choices: simple facts
}


def fetch_command(dest: Path) -> str:
    """The command that puts the source package where `sdist_path` looks for it."""
    return f"{sys.executable} -m pip download --no-deps --no-binary :all: --no-cache-dir bigbench=={VERSION} -d {dest}"


@dataclass(frozen=True)
class PreparedTask:
    """An offline task ready for lm-eval: its YAML (for TaskManager's include_path) and data."""

    name: str
    bigbench_name: str
    directory: Path
    data: Path

    @property
    def source(self) -> str:
        return f"bigbench-{VERSION} {self.bigbench_name}"

    def docs(self) -> list[dict[str, Any]]:
        with open(self.data, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]


def chance_accuracy(docs: Iterable[dict[str, Any]]) -> float:
    """Expected accuracy of a uniform random guess over each document's choices."""
    inv = [1.0 / len(d["choices"]) for d in docs]
    return float(np.mean(inv)) if inv else float("nan")


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").lower() in ("1", "true", "yes")


class PackageUnavailable(ConfigError):
    """The source package is neither cached nor obtainable here (downloads off, or the index does not serve it)."""


def _missing(cache: Path, why: str) -> PackageUnavailable:
    return PackageUnavailable(
        "paths.cache_dir",
        f"the BIG-bench source package {SDIST} is not in {cache} and {why}",
        f"fetch it by hand with `{fetch_command(cache)}`, or set {SDIST_ENV}=/path/to/{SDIST}",
    )


def _download(cache: Path) -> Path:
    """pip download into a temporary folder beside the cache entry, then rename it into place."""
    target = cache / SDIST
    log.info("downloading the BIG-bench source package (bigbench==%s, about 358 MB) into %s", VERSION, cache)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--retries",
            "2",
            "--timeout",
            "30",
            "-q",
            f"bigbench=={VERSION}",
            "-d",
            tmp,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / SDIST
        if proc.returncode != 0 or not got.is_file():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise _missing(cache, f"pip could not download it ({last})")
        os.replace(got, target)
    log.info("downloaded %s (%.0f MB) in %.0fs", SDIST, target.stat().st_size / 1e6, time.perf_counter() - t0)
    return target


def sdist_path(cache_dir: str | Path) -> Path:
    """The source package: AMQ_BIGBENCH_SDIST, else the cached copy, else downloaded once (locked)."""
    if env := os.environ.get(SDIST_ENV):
        path = Path(env).expanduser()
        if not path.is_file():
            raise ConfigError(SDIST_ENV, f"{env!r} is not a file", f"the path of {SDIST} (from `{fetch_command(path.parent)}`)")
        return path
    cache = Path(cache_dir) / "bigbench"
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / SDIST
    with file_lock(target):  # parallel callers: one downloads, the others wait and reuse it
        if target.is_file():
            return target
        if _offline():
            raise _missing(cache, f"downloads are off ({OFFLINE_ENV}=1)")
        return _download(cache)


def format_docs(task: dict[str, Any]) -> list[dict[str, Any]]:
    """One cloze-style document per distinct example, with BIG-bench's prefixes.

    The prompt is BIG-bench's (bigbench/api/json_task.py): task prefix, input prefix (default
    "\\nQ: "), input, output prefix (default "\\nA: "), and each choice is scored as the
    continuation, as its multiple_choice_grade does. The choices are not listed in the prompt,
    even where the task file asks for it (`append_choices_to_input`): that is how lm-eval's own
    multiple-choice tasks (piqa, siqa, arc) prompt, and with the list a 135M model scores at
    chance on social_iqa (docs/zeroshot.md). `label` is the first highest-scoring choice;
    duplicate examples are dropped, as BIG-bench does.
    """
    task_prefix = str(task.get("task_prefix", ""))
    input_prefix = task.get("example_input_prefix", "\nQ: ")
    output_prefix = task.get("example_output_prefix", "\nA: ")
    seen: set[str] = set()
    docs = []
    for ex in task["examples"]:
        key = json.dumps(ex)
        if key in seen or "target_scores" not in ex:
            continue
        seen.add(key)
        scores: dict[str, float] = ex["target_scores"]
        choices = list(scores)
        best = max(scores.values())
        docs.append(
            {
                "prompt": task_prefix + input_prefix + ex["input"] + output_prefix,
                "choices": choices,
                "label": choices.index(next(c for c in choices if scores[c] == best)),
            }
        )
    return docs


def task_yaml(name: str, bigbench_name: str, data: Path, hf_cache: Path) -> str:
    """An lm-eval task reading local JSON lines; the prompt already ends with the output prefix."""
    spec = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(hf_cache)},
        "test_split": "test",
        # Few-shot examples come from the same documents; lm-eval never shows a document its own answer.
        "fewshot_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "prompt",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        # lm-eval moves the prompt's trailing space onto each choice: "A:" + " choice", as BIG-bench scores it.
        "target_delimiter": "",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0, "source": f"bigbench-{VERSION} {bigbench_name}"},
    }
    return yaml.safe_dump(spec, sort_keys=False)


def _member(bigbench_name: str) -> str:
    return f"bigbench-{VERSION}/bigbench/benchmark_tasks/{bigbench_name}/task.json"


def _read_task_files(sdist: Path, bigbench_names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """One pass over the compressed package, parsing only the wanted task.json files."""
    if (digest := file_sha256(sdist)) != SDIST_SHA256:
        raise ConfigError(
            SDIST_ENV if os.environ.get(SDIST_ENV) else "paths.cache_dir",
            f"{sdist} is not the bigbench {VERSION} source package (sha256 {digest[:12]}...)",
            f"delete it and fetch it again with `{fetch_command(sdist.parent)}`",
        )
    wanted = {_member(n): n for n in bigbench_names}
    found: dict[str, dict[str, Any]] = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            if member.name in wanted:
                fh = tar.extractfile(member)
                assert fh is not None
                found[wanted[member.name]] = json.load(fh)
                if len(found) == len(wanted):
                    break
    if lost := sorted(set(bigbench_names) - set(found)):
        raise ConfigError("finalize.tasks", f"{sdist} has no task file for {', '.join(lost)}")
    return found


def prepare_tasks(names: Sequence[str], cache_dir: str | Path) -> list[PreparedTask]:
    """Make the named offline tasks ready for lm-eval; built once per cache and reused after.

    A miss converts every task of OFFLINE_TASKS in one pass over the package (reading the
    package dominates the cost), so later calls for other tasks hit the cache.
    """
    unknown = [n for n in names if n not in OFFLINE_TASKS]
    if unknown:
        raise ConfigError("finalize.tasks", f"not an offline BIG-bench task: {', '.join(unknown)}", ", ".join(OFFLINE_TASKS))
    if not names:  # nothing asked: neither the package nor the cache is needed
        return []
    root = Path(cache_dir) / "bigbench" / FORMAT
    tasks = {n: PreparedTask(n, OFFLINE_TASKS[n], root / n, root / n / "docs.jsonl") for n in OFFLINE_TASKS}
    with file_lock(root):  # parallel callers: one converts, the others wait and reuse it
        if not all((t.directory / f"{t.name}.yaml").is_file() for t in tasks.values()):
            t0 = time.perf_counter()
            sdist = sdist_path(cache_dir)
            log.info("extracting %d BIG-bench tasks from %s", len(tasks), sdist)
            files = _read_task_files(sdist, [t.bigbench_name for t in tasks.values()])
            for t in tasks.values():
                write_jsonl(t.data, format_docs(files[t.bigbench_name]))
                # The YAML last: its presence marks a complete entry.
                atomic_write_text(t.directory / f"{t.name}.yaml", task_yaml(t.name, t.bigbench_name, t.data, root / "hf-datasets"))
            log.info("BIG-bench tasks ready under %s in %.0fs", root, time.perf_counter() - t0)
    return [tasks[n] for n in names]
