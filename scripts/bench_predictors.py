"""Predictor accuracy on configurations the predictor was not fitted on, from real search archives.

For each training size n, every predictor is fitted on the first n records of a search archive
(what the search itself had after n true evaluations) and scored on
  - `next`: the records that search evaluated next (the batches the predictor would have chosen
    among: the realistic, hard case, since they sit near the front), and
  - `random`: truly evaluated random configurations from a separate run (if given),
with Kendall tau, Spearman rho, RMSE (metric units) and fit time. No held-out record is ever in
the training set (checked by gene key).

Features are re-derived from each record's per-module `config.bits` (amq.predictors.archive_data).

    python scripts/bench_predictors.py --train-run RUN_DIR [--heldout-run RANDOM_RUN_DIR] \
        --sizes 50 250 1000 [--predictors rbf mlp gp 'gp:kernel=rbf,encoding=scaled'] \
        [--timing 2000 10000 --timing-predictors rbf gp]
    python scripts/bench_predictors.py --timing 1000 4000 --timing-predictors rbf:backend=scipy rbf:backend=torch

`--make-random N` first evaluates N random configurations with the real pipeline
(`amq.train_search budget.iterations=0 budget.n_initial_random=N`) and uses them as `random`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from amq.config.compose import parse_overrides
from amq.predictors.accuracy import heldout_scores
from amq.predictors.archive_data import load_archive

ROOT = Path(__file__).resolve().parents[1]


def make_predictor(spec: str, seed: int):
    """`name` or `name:key=value,key=value`: conf/predictor/<name>.yaml with overrides."""
    name, _, over = spec.partition(":")
    cfg = OmegaConf.load(ROOT / "conf" / "predictor" / f"{name}.yaml")
    return instantiate(cfg, **parse_overrides(over))(seed=seed)


def score(spec: str, Xtr: np.ndarray, ytr: np.ndarray, tests: dict[str, tuple[np.ndarray, np.ndarray]], seed: int) -> dict:
    t0 = time.perf_counter()
    p = make_predictor(spec, seed).fit(Xtr, ytr)
    out = {"fit_s": time.perf_counter() - t0}
    for name, (X, y) in tests.items():
        s = heldout_scores(p.predict(X), y)
        out[name] = s
    return out


def make_random_run(n: int, seed: int, out_dir: Path) -> Path:
    """Evaluate n random configurations with the real pipeline; returns the run directory."""
    env = {**os.environ, "AMQ_OUTPUT_DIR": str(out_dir), "WANDB_MODE": "disabled"}
    cmd = [
        sys.executable,
        "-m",
        "amq.train_search",
        "logger=none",
        "budget=standard",
        "budget.iterations=0",
        "finalize.enabled=false",
        f"budget.n_initial_random={n}",
        f"seed={seed}",
    ]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    return max((out_dir / "search" / "runs").iterdir())


def timing_rows(sizes: list[int], genes: int, specs: list[str], seed: int, n_predict: int = 2000) -> list[dict]:
    """Fit and predict time on synthetic additive data of the paper budget's scale (time does not
    depend on the values), each spec side by side with the first: time ratio and largest relative
    difference of the predictions on `n_predict` fresh configurations."""
    rng = np.random.default_rng(seed)
    w = rng.lognormal(size=(genes, 3)) * np.array([1.0, 0.1, 0.001])
    levels = np.array([0.0, 0.2, 1.0])
    print(f"\n| predictor | n | genes | fit s | predict {n_predict} s | fit / first's | predict / first's | max rel. diff to first |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    for spec in specs:  # warm-up: library initialisation (thread pools, GPU context) stays out of the numbers
        G = rng.integers(0, 3, size=(50, genes))
        make_predictor(spec, seed).fit(levels[G], w[np.arange(genes), G].sum(1)).predict(levels[G])
    rows: list[dict] = []
    for n in sizes:
        G = rng.integers(0, 3, size=(n + n_predict, genes))
        X, y = levels[G[:n]], w[np.arange(genes), G[:n]].sum(1) * 1e-3
        first: dict | None = None
        for spec in specs:
            t0 = time.perf_counter()
            p = make_predictor(spec, seed).fit(X, y)
            t1 = time.perf_counter()
            pred = p.predict(levels[G[n:]])
            row = {"predictor": spec, "n": n, "genes": genes, "fit_s": t1 - t0, "predict_s": time.perf_counter() - t1}
            first = first or {**row, "pred": pred}
            row.update(
                fit_ratio=row["fit_s"] / first["fit_s"],
                predict_ratio=row["predict_s"] / first["predict_s"],
                max_rel_diff=float(np.max(np.abs(pred / first["pred"] - 1))),
            )
            rows.append(row)
            print(
                f"| {spec} | {n} | {genes} | {row['fit_s']:.2f} | {row['predict_s']:.3f} | {row['fit_ratio']:.3f} | "
                f"{row['predict_ratio']:.3f} | {row['max_rel_diff']:.1e} |",
                flush=True,
            )
    return rows


def _fmt(x: float | None, nd: int = 3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-run", type=Path, default=None, help="run directory whose archive.jsonl is the training pool (needed unless --timing only)")
    ap.add_argument("--heldout-run", type=Path, default=None, help="run directory of random configurations (held out)")
    ap.add_argument("--make-random", type=int, default=0, help="evaluate this many random configurations first")
    ap.add_argument("--sizes", type=int, nargs="+", default=[50, 250, 1000])
    ap.add_argument("--n-next", type=int, default=250, help="how many of the following records to score on")
    ap.add_argument("--predictors", nargs="+", default=["rbf", "mlp", "gp"])
    ap.add_argument("--timing", type=int, nargs="*", default=[], help="also time fits on synthetic data of these sizes")
    ap.add_argument("--timing-genes", type=int, default=220)
    ap.add_argument("--timing-predictors", nargs="+", default=["rbf", "gp"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write all numbers here")
    args = ap.parse_args()

    if args.train_run is None and not args.timing:
        ap.error("give --train-run (accuracy) or --timing (fit and predict time), or both")
    print(f"# machine: {platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads", flush=True)
    out = {"accuracy": accuracy_rows(args) if args.train_run else []}
    if args.timing:
        out["timing"] = timing_rows(args.timing, args.timing_genes, args.timing_predictors, args.seed)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


def accuracy_rows(args: argparse.Namespace) -> list[dict]:
    """Each predictor fitted on the first n records of the training archive, scored on held-out ones."""
    train = load_archive(args.train_run)
    names, y, keys = train.modules, train.metric, train.keys
    lo, hi = float(train.bits.min()), float(train.bits.max())
    X = train.features(lo, hi)
    tests_all: dict[str, tuple[np.ndarray, np.ndarray, list[str]]] = {}
    heldout_run = args.heldout_run
    if args.make_random:
        heldout_run = make_random_run(args.make_random, args.seed + 1000, ROOT / "outputs" / "predbench")
    if heldout_run is not None:
        held = load_archive(heldout_run)
        if held.modules != names:
            raise SystemExit(f"{heldout_run} has different modules than {args.train_run}")
        tests_all["random"] = (held.features(lo, hi), held.metric, held.keys)

    print(f"# train pool {args.train_run} ({len(y)} records, {X.shape[1]} modules); held-out random: {heldout_run}", flush=True)
    lines = [
        "| n train | predictor | fit s | next: tau | next: rho | next: RMSE | random: tau | random: rho | random: RMSE |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    results = []
    for n in args.sizes:
        if n >= len(y):
            print(f"# skipping n={n}: the archive holds {len(y)} records", flush=True)
            continue
        train_keys = set(keys[:n])
        nxt = slice(n, min(len(y), n + args.n_next))
        tests = {"next": (X[nxt], y[nxt])}
        for tname, (tX, ty, tk) in tests_all.items():
            keep = np.array([k not in train_keys for k in tk])
            tests[tname] = (tX[keep], ty[keep])
        assert not train_keys.intersection(keys[nxt]), "held-out records overlap the training set"
        for spec in args.predictors:
            r = score(spec, X[:n], y[:n], tests, args.seed)
            results.append({"n": n, "predictor": spec, **r})
            nx, rd = r["next"], r.get("random", {})
            line = (
                f"| {n} | {spec} | {r['fit_s']:.2f} | {_fmt(nx['predictor/kendall_tau_all_bits'])} | {_fmt(nx['predictor/spearman_all_bits'])} | "
                f"{_fmt(nx['predictor/rmse'], 4)} | {_fmt(rd.get('predictor/kendall_tau_all_bits'))} | {_fmt(rd.get('predictor/spearman_all_bits'))} | "
                f"{_fmt(rd.get('predictor/rmse'), 4)} |"
            )
            lines.append(line)
            print(line, flush=True)
    print("\n" + "\n".join(lines))
    return results


if __name__ == "__main__":
    main()
