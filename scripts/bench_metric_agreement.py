"""Which summary of the calibration divergence ranks near-tied configurations as held-out text does.

A search picks, at each target, the configuration with the lowest calibration metric; near a
target the candidates differ by a few percent, and what matters is whether the metric's order is
held-out perplexity's order. For each finished run directory given, at each target: its `--top`
best configurations at or under the target (by the run's own metric); for each, held-out
perplexity on every held-out text (`amq.bench.heldout`) and the per-token KL and JSD against the
unquantized model on the calibration windows of the composed settings. Then, per target and text,
the Spearman correlation between held-out log-perplexity and each summary of the per-token values:
the mean KL, the mean JSD, and the KL with the highest fraction of tokens left out (`--trims`, as
`metric.trim` does). The configurations of all runs are pooled per target (runs of other metrics
or budgets add candidates the first did not find).

    python scripts/bench_metric_agreement.py experiment=lean_234 num_threads=1 \\
        --runs RUN_A RUN_B --targets 3.0 3.5 4.0 --top 5 --out /tmp/metric_agreement

The Hydra overrides give the model, the calibration windows and the held-out texts; the run
directories must be of the same model and space. Results: --out/results.json and results.md.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from scipy.stats import spearmanr

from amq.bench.heldout import HeldoutPerplexity
from amq.bench.script_args import script_parser
from amq.config.compose import Workbench, prepare
from amq.evaluation.perplexity import PerplexityProtocol
from amq.io import atomic_write_json, atomic_write_text, read_jsonl
from amq.metrics.divergence import trimmed_mean

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("bench_metric_agreement")


def candidates(records: list[dict], target: float, top: int) -> list[dict]:
    """The `top` best of a run's archive records at or under `target`, by the run's own metric."""
    kind = next(iter(records[0]["metrics"]))
    ok = [r for r in records if r["avg_bits"] <= target + 1e-9 and r["metrics"][kind] is not None]
    return sorted(ok, key=lambda r: r["metrics"][kind])[:top]


class TokenDivergences:
    """Per-token KL and JSD of the proxy model against its unquantized self on the composed metric's
    windows: the metric itself (`OutputDivergence.token_values`) in either kind, untrimmed."""

    def __init__(self, wb: Workbench) -> None:
        self.wb = wb
        wb.bank.restore()
        self.metrics = {kind: dataclasses.replace(wb.metric, kind=kind, trim=0.0) for kind in ("kl", "jsd")}

    def __call__(self, bits: dict[str, int]) -> dict[str, np.ndarray]:
        self.wb.bank.apply(bits)
        return {kind: torch.cat(m.token_values(self.wb.bank.model)).double().cpu().numpy() for kind, m in self.metrics.items()}


def summaries(tok: dict[str, np.ndarray], trims: list[float]) -> dict[str, float]:
    """The mean KL, the mean JSD and the trimmed mean KL per trim fraction (as `metric.trim` takes it)."""
    out = {"KL": float(tok["kl"].mean()), "JSD": float(tok["jsd"].mean())}
    for t in trims:
        out[f"KL, top {100 * t:g}% left out"] = trimmed_mean(torch.from_numpy(tok["kl"]), t)
    return out


def main() -> None:
    ap = script_parser(__doc__, "Hydra overrides of conf/train_search.yaml (the runs' model and data)")
    ap.add_argument("--runs", type=Path, nargs="+", required=True, help="finished run directories (archive.jsonl)")
    ap.add_argument("--targets", type=float, nargs="+", default=[3.0, 3.5, 4.0])
    ap.add_argument("--top", type=int, default=5, help="configurations per run and target")
    ap.add_argument("--trims", type=float, nargs="+", default=[0.01, 0.05, 0.1])
    ap.add_argument("--ppl-window", type=int, default=512)
    ap.add_argument("--ppl-windows", type=int, default=16)
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_metric_agreement")
    args = ap.parse_args()
    for run in args.runs:
        if not (run / "archive.jsonl").is_file():
            ap.error(f"--runs {run}: no archive.jsonl there (a finished run directory holds one)")
    if args.top < 3:
        ap.error(f"--top {args.top}: a rank correlation needs at least 3 configurations per run and target")
    if bad := [t for t in args.trims if not 0 <= t < 0.5]:
        ap.error(f"--trims {' '.join(map(str, bad))}: each a fraction in [0, 0.5), as metric.trim takes it")
    archives = {run: list(read_jsonl(run / "archive.jsonl")) for run in args.runs}
    picks = [(t, run, rank, rec) for t in args.targets for run in args.runs for rank, rec in enumerate(candidates(archives[run], t, args.top))]
    if empty := [f"{t:g}" for t in args.targets if not any(p[0] == t for p in picks)]:
        ap.error(f"--targets {' '.join(empty)}: no configuration of the runs is at or under it")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="train_search", overrides=["logger=none", "eval_cache=none", "finalize.enabled=false", *args.overrides, f"paths.output_dir={args.out}"]
        )
    wb = prepare(cfg)
    ppl = HeldoutPerplexity(wb, PerplexityProtocol(args.ppl_window, args.ppl_windows, wb.lm.add_bos))
    divergences = TokenDivergences(wb)

    rows = []
    for i, (target, run, rank, rec) in enumerate(picks, 1):
        bits = rec["config"]["bits"]
        row = {"run": str(run), "target": target, "rank": rank, "avg_bits": rec["avg_bits"], "perplexity": ppl(bits)}
        row["calibration"] = summaries(divergences(bits), args.trims)
        rows.append(row)
        log.info("%d/%d: %s @ %g #%d: %s", i, len(picks), run, target, rank, row)
    texts = ppl.texts
    names = list(rows[0]["calibration"])
    lines = ["| target | configurations | text | " + " | ".join(names) + " |", "|" + " --- |" * (len(names) + 3)]
    agreement: dict[str, dict[str, dict[str, float]]] = {}
    for target in args.targets:
        at = [r for r in rows if r["target"] == target]
        for text in texts:
            y = np.log([r["perplexity"][text] for r in at])
            rho = {n: float(spearmanr([r["calibration"][n] for r in at], y)[0]) for n in names}
            agreement.setdefault(f"{target:g}", {})[text] = rho
            lines.append(f"| {target:g} | {len(at)} | {text} | " + " | ".join(f"{rho[n]:.2f}" for n in names) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "results.json", {"overrides": args.overrides, "rows": rows, "spearman": agreement})
    atomic_write_text(args.out / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
