"""Shared fixtures: the real conf/ composed through Hydra's compose API, and a CLI runner.

Tests write only inside pytest's temporary folders (under `--basetemp`, by default
/tmp/pytest-of-<user>/pytest-<n>/). At the start of a session (pytest_configure, before test modules
are imported) the environment is pointed there, and every process a test starts inherits it:

    AMQ_CACHE_DIR   <basetemp>/amq-session/cache: the converted model, proxy weights, sensitivity
                    tables, evaluation cache, BIG-bench task files. Shared by all tests of the
                    session (the model is converted once per session, about 15 s) and deleted when
                    the session ends (it holds about 0.8 GB).
    AMQ_OUTPUT_DIR  <basetemp>/amq-session/outputs, for runs whose test does not choose a folder.
    WANDB_DIR, WANDB_CACHE_DIR, WANDB_CONFIG_DIR, WANDB_DATA_DIR
                    <basetemp>/amq-session/wandb/...: W&B's files, wherever a run does not set them.

The values the caller had are restored when the session ends.

    AMQ_TEST_CACHE_DIR=<dir>   opt-in: use <dir> as the cache, kept across sessions (a warm cache:
                               no conversion, no proxy build). It may be ~/.cache/amq itself.

The BIG-bench source package (358 MB, for the zero-shot tests) is downloaded into the session cache
unless AMQ_BIGBENCH_SDIST names a copy, or the user cache (~/.cache/amq, or the caller's
AMQ_CACHE_DIR) holds one: the session cache then links to it (read only; its sha256 is checked).

The checks that plain transformers loads amq's checkpoints (amq never imported) run their scripts
in one kept process of the session (`plain_python`), not in a new process each.

A guard (`_no_files_outside_tmp`, autouse) fails a test after which new files appear in the
repository checkout (top-level entries, and outputs/, multirun/, wandb/, .cache/ three levels deep)
or in the user's cache and output folders (~/.cache/amq, the caller's AMQ_CACHE_DIR and
AMQ_OUTPUT_DIR). It rescans only folders whose modification time changed, so it costs well under a
millisecond per test. amq/, tests/, conf/ are not watched: people edit them while tests run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

SESSION_ENV = ("AMQ_CACHE_DIR", "AMQ_OUTPUT_DIR", "WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR")
SHARED_CACHE_ENV = "AMQ_TEST_CACHE_DIR"


# ---------------------------------------------------------------------------- the session's folders
@pytest.hookimpl(trylast=True)  # after pytest's tmpdir plugin has made config._tmp_path_factory
def pytest_configure(config: pytest.Config) -> None:
    saved = {k: os.environ.get(k) for k in SESSION_ENV}
    config.add_cleanup(lambda: _restore_env(saved))
    user_cache = Path(saved["AMQ_CACHE_DIR"] or Path.home() / ".cache" / "amq").expanduser().absolute()
    home_cache = (Path.home() / ".cache" / "amq").absolute()

    factory = getattr(config, "_tmp_path_factory", None)  # how pytest's own plugin shares it at configure time
    if factory is not None:
        base = factory.mktemp("amq-session", numbered=False)
    else:  # pytest without its tmpdir plugin (-p no:tmpdir)
        base = Path(tempfile.mkdtemp(prefix="amq-session-"))
        config.add_cleanup(lambda: shutil.rmtree(base, ignore_errors=True))

    shared = os.environ.get(SHARED_CACHE_ENV, "").strip()
    if shared:
        cache = Path(shared).expanduser().absolute()
        cache.mkdir(parents=True, exist_ok=True)
    else:
        cache = base / "cache"
        cache.mkdir()
        config.add_cleanup(lambda: shutil.rmtree(cache, ignore_errors=True))
        _link_bigbench_sdist(user_cache, cache)
        if home_cache != user_cache:
            _link_bigbench_sdist(home_cache, cache)
    wandb = base / "wandb"
    os.environ.update(
        {
            "AMQ_CACHE_DIR": str(cache),
            "AMQ_OUTPUT_DIR": str(base / "outputs"),
            "WANDB_DIR": str(wandb),
            "WANDB_CACHE_DIR": str(wandb / ".cache"),
            "WANDB_CONFIG_DIR": str(wandb / ".config"),
            "WANDB_DATA_DIR": str(wandb / ".data"),
        }
    )

    watched = [(ROOT, 1)] + [(ROOT / d, 3) for d in ("outputs", "multirun", "wandb", ".cache")]
    watched += [(home_cache, 3), (user_cache, 3)]
    if saved["AMQ_OUTPUT_DIR"]:
        watched.append((Path(saved["AMQ_OUTPUT_DIR"]).expanduser().absolute(), 3))
    config.stash[_GUARD] = _NewFiles(watched, exclude=[cache, base])


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """Beside the durations (also under -q): the CPU the suite's times come from (an AVX2-only CPU
    takes about 2.5x as long: the model computes in float32 there) and the dtype `dtype: auto` picks."""
    import torch

    from amq.devices import resolve_dtype

    chosen = resolve_dtype("auto", torch.device("cpu"))
    terminalreporter.write_line(
        f"amq: {os.cpu_count()} CPUs, torch CPU capability {torch.backends.cpu.get_cpu_capability()}, models compute in {chosen.name} ({chosen.reason})"
    )


def _restore_env(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _link_bigbench_sdist(user_cache: Path, cache: Path) -> None:
    """Reuse the user's BIG-bench source package (checked by its sha256 where it is read)."""
    for sdist in sorted((user_cache / "bigbench").glob("bigbench-*.tar.gz")):
        link = cache / "bigbench" / sdist.name
        if sdist.is_file() and not link.exists():
            link.parent.mkdir(exist_ok=True)
            link.symlink_to(sdist)


# ---------------------------------------------------------------------------- the guard
# Never reported: build and tool folders, git's own files.
IGNORED_NAMES = {".git", ".venv", ".pytest_cache", "__pycache__", ".mypy_cache", ".ruff_cache"}
IGNORED_SUFFIXES = (".egg-info",)


class _NewFiles:
    """Paths that appeared under watched folders (listed `depth` levels deep) since the last call.

    A folder is listed again only when its modification time changed (creating, removing or renaming
    an entry changes it) or is under two seconds old (coarse file-system clocks); otherwise a check
    costs one stat. A new folder is reported, not each file in it."""

    def __init__(self, roots: list[tuple[Path, int]], exclude: list[Path]) -> None:
        self.exclude = [str(p.absolute()) for p in exclude]
        self.roots = {str(p.absolute()): depth for p, depth in roots if not self._excluded(str(p.absolute()))}
        self.listings: dict[str, tuple[int, frozenset[str], tuple[str, ...]]] = {}  # folder -> mtime, names, subfolders
        self._walk(None)

    def new(self) -> list[str]:
        added: list[str] = []
        self._walk(added)
        return sorted(p for p in added if not self._excluded(p))

    def _excluded(self, path: str) -> bool:
        return any(path == e or path.startswith(e + os.sep) for e in self.exclude)

    def _walk(self, added: list[str] | None) -> None:
        self.fresh_after = time.time_ns() - 2_000_000_000
        for root, depth in self.roots.items():
            if root not in self.listings and added is not None and os.path.isdir(root):
                added.append(root)  # a watched folder that did not exist before
            self._visit(root, depth, added if root in self.listings else None)

    def _visit(self, folder: str, depth: int, added: list[str] | None) -> None:
        try:
            mtime = os.stat(folder).st_mtime_ns
        except OSError:
            self.listings.pop(folder, None)
            return
        cached = self.listings.get(folder)
        if cached is None or cached[0] != mtime or mtime >= self.fresh_after:
            names, subdirs = [], []
            try:
                with os.scandir(folder) as entries:
                    for e in entries:
                        if e.name in IGNORED_NAMES or e.name.endswith(IGNORED_SUFFIXES):
                            continue
                        names.append(e.name)
                        if e.is_dir(follow_symlinks=False):
                            subdirs.append(e.name)
            except OSError:
                return
            if cached is not None and added is not None:
                added.extend(os.path.join(folder, n) for n in names if n not in cached[1])
            cached = (mtime, frozenset(names), tuple(subdirs))
            self.listings[folder] = cached
        if depth > 1:
            for name in cached[2]:
                sub = os.path.join(folder, name)
                # a folder seen for the first time was reported (or was there at the start) as a whole
                self._visit(sub, depth - 1, added if sub in self.listings else None)


_GUARD = pytest.StashKey[_NewFiles]()


def _describe(paths: list[str]) -> str:
    shown = "\n  ".join(paths[:10]) + (f"\n  ... and {len(paths) - 10} more" if len(paths) > 10 else "")
    return (
        f"files written outside the test's temporary folders:\n  {shown}\n"
        "write under tmp_path / tmp_path_factory, or AMQ_CACHE_DIR / AMQ_OUTPUT_DIR (tests/conftest.py sets both)"
    )


@pytest.fixture(autouse=True)
def _no_files_outside_tmp(request):
    """Fails the test (at teardown) after which new files appear in the checkout or the user's cache
    (files a session- or module-scoped fixture writes are blamed on the first test that uses it)."""
    yield
    guard = request.config.stash.get(_GUARD, None)
    if guard is not None and (new := guard.new()):
        pytest.fail(_describe(new), pytrace=False)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """What fixtures wrote while being torn down after the last test."""
    guard = session.config.stash.get(_GUARD, None)
    if guard is not None and (new := guard.new()):
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(_describe(new), red=True, bold=True)
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def bigbench_tasks() -> None:
    """The offline BIG-bench tasks ready in the session's cache, or every test that needs them
    skipped, with the reason: their source package (bigbench 1.0.0) comes from the package index
    (or AMQ_BIGBENCH_SDIST, or a user cache), and an index that does not serve it is no fault of
    amq's. Any other refusal (a damaged package, say) still fails. One attempt per session."""
    from amq.evaluation.bigbench import OFFLINE_TASKS, PackageUnavailable, prepare_tasks

    try:
        prepare_tasks(list(OFFLINE_TASKS), os.environ["AMQ_CACHE_DIR"])
    except PackageUnavailable as exc:
        pytest.skip(f"the BIG-bench source package is unavailable here: {exc}")


@pytest.fixture(scope="session")
def compose_cfg():
    def _compose(overrides: list[str] | None = None) -> DictConfig:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(config_name="train_search", overrides=overrides or [], return_hydra_config=True)

    return _compose


def run_cli(args: list[str], out_dir: Path, timeout: int = 600, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m amq.train_search` as a user would, with outputs under `out_dir`."""
    env = {**os.environ, "AMQ_OUTPUT_DIR": str(out_dir), "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "amq.train_search", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_cli_in_process(args: list[str], out_dir: Path, monkeypatch, capfd, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """`amq-search` as `run_cli` runs it, in this process: the same entry point (`main()` through
    Hydra, sys.argv and the environment), the same exit status and stderr, without the seconds of
    interpreter start and imports a new process pays. For runs that stop early (refused settings)."""
    from amq.train_search import main

    for key, value in {"AMQ_OUTPUT_DIR": str(out_dir), "WANDB_MODE": "disabled", **(env_extra or {})}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "argv", ["amq-search", *args])
    return main_in_process("amq-search", main, None, capfd)  # Hydra reads sys.argv


def main_in_process(prog: str, main: Callable[..., int | None], argv: list[str] | None, capfd) -> subprocess.CompletedProcess:
    """`main(argv)` (`main()`, reading sys.argv, if argv is None) of one of amq's commands in this
    process, as its console script runs it: the exit status it returns or exits with, and what it
    wrote, with its own logging set up as in a new process (the root logger's handlers are set aside
    while it runs, then restored)."""
    capfd.readouterr()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    root.handlers[:] = []  # logging.basicConfig configures only a root logger without handlers
    try:
        result = main() if argv is None else main(argv)
        code = result if isinstance(result, int) else 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:  # Hydra's job logging points at the run's log file, which a refused run removes
        for h in root.handlers:
            if h not in handlers:
                h.close()
        root.handlers[:] = handlers
        root.setLevel(level)
    captured = capfd.readouterr()
    return subprocess.CompletedProcess([prog, *(sys.argv[1:] if argv is None else argv)], code, captured.out, captured.err)


def search_in_process(overrides: list[str], run_dir: Path) -> tuple[dict, Any]:
    """`amq.train_search.run(cfg)` in this process, as scripts call it: the real conf/ composed with
    `overrides`, outputs in `run_dir`; returns (summary, the objects the run built)."""
    from amq.train_search import run

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train_search", overrides=[*overrides, f"paths.output_dir={run_dir}"])
    return run(cfg)


# ---------------------------------------------------------------------------- plain transformers
# Runs each script sent to it (JSON lines: code and argv) as `python -c code *argv` would, with its
# stdout captured, and answers with one JSON line: exit status, stdout, traceback. It imports nothing
# of amq's, so a script can still check that loading a checkpoint never imported amq.
_PLAIN_WORKER = """
import contextlib, io, json, sys, traceback
for line in sys.stdin:
    job, out = json.loads(line), io.StringIO()
    sys.argv = ["-c", *job["argv"]]
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(job["code"], "<plain script>", "exec"), {"__name__": "__main__"})
        rc, err = 0, ""
    except BaseException:
        rc, err = 1, traceback.format_exc()
    sys.__stdout__.write(json.dumps({"rc": rc, "stdout": out.getvalue(), "stderr": err}) + "\\n")
    sys.__stdout__.flush()
"""


class PlainPython:
    """One Python process without amq, kept for the session, in which the checks that plain
    transformers loads amq's checkpoints run their scripts: its interpreter start and the imports of
    torch, transformers and compressed-tensors (about 5 s a process) are paid once, not per check.
    Its own stderr (library warnings, progress bars) goes to `log`."""

    def __init__(self, cwd: Path, log: Path):
        self._log = open(log, "w")
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _PLAIN_WORKER], cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True
        )

    def run(self, code: str, argv: list[str], timeout: float = 1200) -> subprocess.CompletedProcess:
        """`python -c code *argv`, run in the kept process."""
        self._proc.stdin.write(json.dumps({"code": code, "argv": argv}) + "\n")
        self._proc.stdin.flush()
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        line = self._proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            raise RuntimeError(f"the plain transformers process gave no answer (exit status {self._proc.returncode}); its stderr: {self._log.name}")
        answer = json.loads(line)
        return subprocess.CompletedProcess(["python", "-c", "<script>", *argv], answer["rc"], answer["stdout"], answer["stderr"])

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._log.close()


@pytest.fixture(scope="session")
def plain_python(tmp_path_factory) -> PlainPython:
    """The session's process for plain-transformers scripts (`PlainPython`)."""
    root = tmp_path_factory.mktemp("plain")
    worker = PlainPython(root, root / "stderr.log")
    yield worker
    worker.close()


def run_script(script: str, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """Run one of scripts/ as its docstring shows, with W&B off."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, f"scripts/{script}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def load_script(script: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """One of scripts/ imported as a module (to test its pieces in this process), registered in
    sys.modules while `monkeypatch` lasts (dataclasses look their module up there)."""
    import importlib.util

    name = Path(script).stem
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def run_module(module: str, args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    """Run one of amq's command-line modules (`python -m amq.<module>`) from the repository root."""
    return subprocess.run([sys.executable, "-m", f"amq.{module}", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def settings_yaml(cfg: DictConfig) -> str:
    """A run's config.yaml for a composed config, less `hydra` and `paths` (resolved first: settings
    such as data.cache_dir interpolate paths)."""
    from omegaconf import OmegaConf

    resolved = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k] for k in cfg if k not in ("hydra", "paths")}
    return OmegaConf.to_yaml(OmegaConf.create(resolved))


def run_dirs(out_dir: Path) -> list[Path]:
    base = out_dir / "search" / "runs"
    return sorted(p for p in base.iterdir() if p.is_dir()) if base.exists() else []


# Seconds of work, bit-identical metrics across processes (fixed threads, eager arithmetic), and
# every configuration measured (no evaluation cache), so runs can be compared with each other;
# no finalize stage (tests/test_finalize.py turns it on).
SMOKE = ["budget=smoke", "logger=none", "metric.compile=false", "num_threads=2", "eval_cache=none", "finalize.enabled=false"]


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One uninterrupted smoke search (seed 3): the reference that resumed runs must reproduce."""
    out = tmp_path_factory.mktemp("smoke")
    proc = run_cli([*SMOKE, "seed=3"], out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = run_dirs(out)
    return run_dir, proc


# The smoke search again, in this process (`run(cfg)`, as scripts call it), with a confirmation pass
# over as many other windows as the search's (64 tokens each); the pass adds no archive record, so
# its archive is the CLI run's (test_pipeline checks that bit for bit, test_confirmation the pass).
CONFIRM_SAMPLES = 2
CONFIRM = [*SMOKE, "seed=3", f"search.confirm.samples={CONFIRM_SAMPLES}", "search.confirm.band=1.0"]


@pytest.fixture(scope="session")
def confirmed_run(tmp_path_factory) -> tuple[Path, dict, Any]:
    """(run directory, summary, the objects the run built) of the CONFIRM search."""
    run_dir = tmp_path_factory.mktemp("confirm") / "run"
    summary, objects = search_in_process(CONFIRM, run_dir)
    return run_dir, summary, objects


# One finalized smoke search that test_finalize, test_finalize_cli and test_tracking_path share: the
# session's smoke settings and seed (its cached proxy and sensitivity table are reused), an offline
# W&B run, and the search's own HQQ finalize stage at the three default budgets with one extra front
# point and one window a text.
TRACKED_SEARCH = [o for o in SMOKE if not o.startswith(("logger=", "finalize.enabled="))]
TRACKED_SEARCH += ["seed=3", "logger=wandb", "finalize.extra_front_points=1", "finalize.max_windows=1"]
# `amq-finalize` on it: AWQ on one budget, its searches shrunk (the folding is checked, not the search), no baselines.
AWQ_FINALIZE = [
    "finalizer=awq",
    "finalizer.n_grid=2",
    "finalizer.clip=false",
    "finalize.targets=[4.25]",
    "finalize.baselines=false",
    "finalize.extra_front_points=0",
    "finalize.max_windows=1",
]


def run_command(module: str, args: list[str], timeout: int = 1200) -> subprocess.CompletedProcess:
    """`python -m amq.cli.<module>` with WANDB_MODE unset: the mode the search recorded applies."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    return subprocess.run([sys.executable, "-m", f"amq.cli.{module}", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def tree_digest(run: Path) -> dict[str, str]:
    """sha256 of every file under a run directory, less what `amq-finalize` adds (finalized/)."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*")) if p.is_file() and "finalized" not in p.parts}


@dataclass(frozen=True)
class Finalized:
    """A run finalized again by `amq-finalize`: the run, the new directory, the command, the run's files before."""

    run: Path
    out: Path
    proc: subprocess.CompletedProcess
    before: dict[str, str]


@pytest.fixture(scope="session")
def searched(tmp_path_factory) -> Path:
    """The shared finalized smoke search (TRACKED_SEARCH), with its offline W&B run."""
    out = tmp_path_factory.mktemp("wandb_search")
    proc = run_cli(TRACKED_SEARCH, out, timeout=1500, env_extra={"WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run_dir,) = run_dirs(out)
    return run_dir


@pytest.fixture(scope="session")
def awq_finalized(searched) -> Finalized:
    """`amq-finalize <searched> finalizer=awq` (the W&B mode comes from the run's config.yaml)."""
    before = tree_digest(searched)
    proc = run_command("finalize", [str(searched), *AWQ_FINALIZE, "num_threads=2"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    (out,) = (searched / "finalized").iterdir()
    return Finalized(searched, out, proc, before)


SMOLLM2_SHAPES = {  # (in, out) of SmolLM2-135M's decoder linears
    "q_proj": (576, 576),
    "k_proj": (576, 192),
    "v_proj": (576, 192),
    "o_proj": (576, 576),
    "gate_proj": (576, 1536),
    "up_proj": (576, 1536),
    "down_proj": (1536, 576),
}


def smollm2_linears(blocks: int = 30) -> list:
    """SmolLM2-135M's 210 decoder linears as discovery describes them, without loading the model:
    for search tests that need the real shapes and names but no weights."""
    from amq.modeling.discovery import LinearInfo

    def module(role: str) -> str:
        return "mlp" if role in ("gate_proj", "up_proj", "down_proj") else "self_attn"

    return [LinearInfo(f"model.layers.{b}.{module(r)}.{r}", b, r, *SMOLLM2_SHAPES[r]) for b in range(blocks) for r in SMOLLM2_SHAPES]
