"""lm-eval's index of its built-in tasks, kept in amq's cache.

lm-eval's `TaskManager` finds task names by parsing every YAML file of its task folder (about
26,600 files in lm-eval 0.4.13; 13-18 s on 2 CPU cores), and does so each time one is made. A run
that names a task from the hub needs one to check the names before any model loads, and another
to score them. The index depends only on the installed lm-eval, so the first build is saved (one
pickle per lm-eval version and install folder) and later ones, in this process or the next, load
it in well under a second. A file that cannot be read is ignored and built again.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import pickle
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from amq.evaluation.bigbench import OFFLINE_TASKS, PreparedTask
from amq.io import atomic_write_bytes_with, file_lock

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

log = logging.getLogger(__name__)

INDEX_DIR = "lm_eval_index"


def task_manager(tasks: Sequence[str], offline: Sequence[PreparedTask], cache_dir: str | Path) -> TaskManager:
    """lm-eval's task index over amq's offline tasks, plus its built-in tasks when a name is not
    one of them (their index comes from `cache_dir` once it has been built there)."""
    from lm_eval.tasks import TaskManager

    include = [str(t.directory) for t in offline] or None
    if all(t in OFFLINE_TASKS for t in tasks):
        return TaskManager(include_path=include, include_defaults=False)
    with _saved_default_index(Path(cache_dir) / INDEX_DIR):
        return TaskManager(include_path=include, include_defaults=True)


def _builtin_tasks_dir() -> Path:
    """The folder of lm-eval's built-in task YAMLs (the one `include_defaults` indexes)."""
    from lm_eval.tasks import _index

    return Path(_index.__file__).parent.resolve()


def index_file(folder: Path) -> Path:
    """Where the built-in tasks' index of the installed lm-eval is kept."""
    import lm_eval

    key = hashlib.sha256(f"{lm_eval.__version__}|{_builtin_tasks_dir()}|{sys.version_info[:2]}".encode()).hexdigest()[:16]
    return folder / f"lm_eval-{lm_eval.__version__}-{key}.pkl"


@contextlib.contextmanager
def _saved_default_index(folder: Path) -> Iterator[None]:
    """While a TaskManager is made: its built-in folder's index is read from (or written to)
    `folder`; other folders (amq's offline tasks) are indexed as lm-eval does."""
    from lm_eval.tasks import _index

    original = _index.TaskIndex.__dict__["build"]
    build = original.__func__
    default_root, saved = _builtin_tasks_dir(), index_file(folder)

    def cached_build(paths: Iterable[Path], *, resolve_includes: bool = True) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for root in paths:
            if Path(root).resolve() == default_root and resolve_includes:
                merged.update(_load_or_build(saved, lambda r=root: build([r], resolve_includes=True)))
            else:
                merged.update(build([root], resolve_includes=resolve_includes))
        return merged

    _index.TaskIndex.build = staticmethod(cached_build)
    try:
        yield
    finally:
        _index.TaskIndex.build = original


def _load_or_build(path: Path, build: Any) -> dict[str, Any]:
    index = _read(path)
    if index is not None:
        return index
    with file_lock(path):  # parallel runs: one builds, the others wait and read it
        index = _read(path)
        if index is None:
            t0 = time.perf_counter()
            index = build()
            atomic_write_bytes_with(path, lambda tmp: Path(tmp).write_bytes(pickle.dumps(index, protocol=pickle.HIGHEST_PROTOCOL)))
            log.info("lm-eval's task index: %d names in %.0fs, kept in %s", len(index), time.perf_counter() - t0, path)
    return index


def _read(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        index = pickle.loads(path.read_bytes())
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file: build the index again
        log.warning("lm-eval's task index %s is unreadable (%s); building it again", path, type(exc).__name__)
        return None
    return index if isinstance(index, dict) and index else None
