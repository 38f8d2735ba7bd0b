"""Shared fixtures: the real conf/ composed through Hydra's compose API, and a CLI runner.

Caches (converted model, proxy weights, sensitivity tables) go to AMQ_CACHE_DIR when set, else to
~/.cache/amq as for users, so the model is converted once per machine, not once per test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


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
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


def run_cli_in_process(args: list[str], out_dir: Path, monkeypatch, capfd, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """`amq-search` as `run_cli` runs it, in this process: the same entry point (`main()` through
    Hydra, sys.argv and the environment), the same exit status and stderr, without the seconds of
    interpreter start and imports a new process pays. For runs that stop early (refused settings)."""
    from amq.train_search import main

    for key, value in {"AMQ_OUTPUT_DIR": str(out_dir), "WANDB_MODE": "disabled", **(env_extra or {})}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "argv", ["amq-search", *args])
    capfd.readouterr()
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    captured = capfd.readouterr()
    return subprocess.CompletedProcess(["amq-search", *args], code, captured.out, captured.err)


def run_script(script: str, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """Run one of scripts/ as its docstring shows, with W&B off."""
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, f"scripts/{script}", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


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
