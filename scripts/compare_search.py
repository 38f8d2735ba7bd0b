"""Compare search arms (e.g. predictor=rbf vs predictor=gp search.kappa=1) at the same true-evaluation budget.

Runs `amq.train_search` once per arm and seed (sequentially: one heavy process at a time), then
reads each run's metrics.jsonl (final hypervolume) and summary.json (`best_at_target`) and prints
a markdown table: per arm, the mean and per-seed values.

    python scripts/compare_search.py --arms 'predictor=rbf' 'predictor=gp search.kappa=1' \
        --seeds 0 1 2 -- budget=standard budget.iterations=4

Arguments after `--` go to every run. Already finished runs (found by their overrides in
`--out`) are reused, so an interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _finished_runs(out: Path) -> dict[tuple[str, ...], Path]:
    runs = {}
    base = out / "search" / "runs"
    for d in sorted(base.iterdir()) if base.exists() else []:
        if (d / "summary.json").exists() and (d / ".hydra" / "overrides.yaml").exists():
            runs[tuple(sorted(yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text())))] = d
    return runs


def run_arm(overrides: list[str], out: Path) -> Path:
    key = tuple(sorted(overrides))
    done = _finished_runs(out)
    if key in done:
        return done[key]
    env = {**os.environ, "AMQ_OUTPUT_DIR": str(out), "WANDB_MODE": "disabled"}
    print("+ python -m amq.train_search " + " ".join(shlex.quote(o) for o in overrides), flush=True)
    subprocess.run([sys.executable, "-m", "amq.train_search", *overrides], cwd=ROOT, env=env, check=True)
    return _finished_runs(out)[key]


def read_run(d: Path) -> dict:
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((d / "summary.json").read_text())
    taus = [r["predictor/kendall_tau"] for r in rows if r.get("predictor/kendall_tau") is not None]
    fits = [r["predictor/fit_seconds"] for r in rows if r.get("predictor/fit_seconds") is not None]
    return {
        "hv": rows[-1]["hypervolume"],
        "evals": summary["true_evaluations"],
        "best": {t: v["jsd"] for t, v in summary["best_at_target"].items()},
        "tau": float(np.mean(taus)) if taus else None,
        "fit_s": float(np.mean(fits)) if fits else None,
        "dir": str(d),
    }


def main() -> None:
    argv = sys.argv[1:]
    common = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", nargs="+", required=True, help="one quoted string of overrides per arm")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "compare")
    args = ap.parse_args(argv)

    results: dict[str, list[dict]] = {}
    for arm in args.arms:
        for seed in args.seeds:
            d = run_arm(["logger=none", *common, *shlex.split(arm), f"seed={seed}"], args.out)
            results.setdefault(arm, []).append(read_run(d))

    targets = sorted({t for rs in results.values() for r in rs for t in r["best"]}, key=float)
    head = (
        ["arm", "true evals", "final HV (mean)", "HV per seed"]
        + [f"JSD @{t}b (mean)" for t in targets]
        + ["held-out tau (mean over iterations)", "fit s / iteration"]
    )
    print("\n| " + " | ".join(head) + " |\n|" + " --- |" * len(head))
    for arm, rs in results.items():
        cells = [f"`{arm}`", f"{np.mean([r['evals'] for r in rs]):.0f}", f"{np.mean([r['hv'] for r in rs]):.4f}", " / ".join(f"{r['hv']:.4f}" for r in rs)]
        for t in targets:
            vals = [r["best"].get(t) for r in rs]
            cells.append("-" if None in vals else f"{np.mean(vals):.4f} ({' / '.join(f'{v:.4f}' for v in vals)})")
        taus = [r["tau"] for r in rs if r["tau"] is not None]
        fits = [r["fit_s"] for r in rs if r["fit_s"] is not None]
        cells += [f"{np.mean(taus):.3f}" if taus else "-", f"{np.mean(fits):.2f}" if fits else "-"]
        print("| " + " | ".join(cells) + " |")
    print("\nruns:\n" + "\n".join(f"- {arm} seed {s}: {r['dir']}" for arm, rs in results.items() for s, r in zip(args.seeds, rs)))


if __name__ == "__main__":
    main()
