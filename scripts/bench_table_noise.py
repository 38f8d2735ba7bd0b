"""How noisy a one-window sensitivity table is, and how much `search.shrink_table` and
`search.sensitivity_widths=estimated` take out.

Probes every linear at every width below the highest (as `search.sensitivity_widths=all` does) on
every calibration window of the composed settings, keeping the per-token values. Then, taking each
window in turn as the probe window (what a table with `budget.sensitivity_samples=1` sees), it
compares that window's damages, as probed, as shrunk (amq.search.table_shrinkage) and as estimated
from its lowest-width probes and its own output errors (amq.search.output_error), with the
mean damage over the other windows: Spearman correlation and mean squared error per width, and how
far the probe's standard error (`paired_stderr`) predicts the difference (the standard deviation
of difference / combined standard error: 1.0 when the errors are right).

    python scripts/bench_table_noise.py experiment=lean_234 num_threads=2 --out /tmp/table_noise

Hydra overrides go before the options. Results: --out/results.json and results.md.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from amq.bench.script_args import script_parser
from amq.config.compose import compose_config, prepare
from amq.io import atomic_write_json, atomic_write_text
from amq.search.output_error import estimate_middle_widths, output_errors
from amq.search.sensitivity import SensitivityTable
from amq.search.table_shrinkage import shrink_middle_widths

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("amq.bench_table_noise")


def window_stats(diff: np.ndarray, windows: int) -> tuple[np.ndarray, np.ndarray]:
    """[linears, windows] mean per-token change and its standard error (tokens independent): the
    estimate `amq.search.sensitivity.paired_stderr` gives one probe, for every linear and window at once."""
    per = diff.reshape(diff.shape[0], windows, -1)
    return per.mean(axis=2), per.std(axis=2, ddof=1) / np.sqrt(per.shape[2])


def compare(
    window: int, names: list[str], bits: list[int], means: dict[int, np.ndarray], errors: dict[int, np.ndarray], output: dict[int, dict[str, float]]
) -> list[dict]:
    """Per width: the probe window's damages, as probed, as shrunk and as estimated from the
    window's `output` errors (middle widths), against the other windows' mean."""
    low, middle = bits[0], bits[1:-1]
    table = SensitivityTable(
        dict(zip(names, means[low][:, window].tolist())),
        0.0,
        low,
        bits[-1],
        "",
        0.0,
        mid={b: dict(zip(names, means[b][:, window].tolist())) for b in middle},
        stderr={b: dict(zip(names, errors[b][:, window].tolist())) for b in bits[:-1]},
    )
    shrunk = shrink_middle_widths(table)
    estimated = estimate_middle_widths(table, output, 0)
    rows = []
    for b in bits[:-1]:
        others = np.delete(means[b], window, axis=1)
        truth = others.mean(axis=1)
        probed = means[b][:, window]
        estimates = {"probed": probed}
        if b in middle:
            estimates |= {kind: np.array([t.mid[b][n] for n in names]) for kind, t in (("shrunk", shrunk), ("estimated", estimated))}
        # the other windows' mean has its own error: its variance is about that of one window over their count
        combined = np.sqrt(errors[b][:, window] ** 2 + (np.delete(errors[b], window, axis=1) ** 2).mean(axis=1) / others.shape[1])
        row = {"window": window, "bits": b, "negative": int((probed < 0).sum()), "error_scale": float(np.std((probed - truth) / combined))}
        for kind, est in estimates.items():
            row[f"spearman {kind}"] = float(spearmanr(est, truth)[0])
            row[f"mse {kind}"] = float(np.mean((est - truth) ** 2))
        rows.append(row)
    return rows


def main() -> None:
    ap = script_parser(__doc__, "Hydra overrides of conf/train_search.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_table_noise")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = compose_config(["logger=none", "eval_cache=none", "finalize.enabled=false", *args.overrides, f"paths.output_dir={args.out / 'run'}"])
    wb = prepare(cfg)
    windows = int(wb.tokens.shape[0])
    if windows < 3 or len(wb.bits) < 3:
        ap.error(f"needs at least 3 calibration windows (budget.n_samples, now {windows}) and 3 widths (search.bits, now {wb.bits})")
    names, bits, bank, metric = wb.layout.names, list(wb.bits), wb.bank, wb.metric
    bank.apply(dict.fromkeys(names, bits[-1]))
    base = metric.evaluate_tokens(bank.model, bank.block_states())[1].numpy()
    means, errors = {}, {}
    t0 = time.perf_counter()
    for b in bits[:-1]:
        diff = np.zeros((len(names), base.size))
        for i, name in enumerate(names):
            bank.apply({name: b})
            diff[i] = metric.evaluate_tokens(bank.model, bank.block_states())[1].numpy() - base
            bank.apply({name: bits[-1]})
            if i % 25 == 0:
                log.info("%d-bit probes: %d/%d (%.0fs)", b, i, len(names), time.perf_counter() - t0)
        means[b], errors[b] = window_stats(diff, windows)
    output = [output_errors(bank, wb.tokens[w : w + 1], [[n] for n in names], bits) for w in range(windows)]  # each window's own
    rows = [r for w in range(windows) for r in compare(w, names, bits, means, errors, output[w])]
    keys = list(dict.fromkeys(k for r in rows for k in r if k not in ("window", "bits")))
    lines = ["| probe window | bits | " + " | ".join(keys) + " |", "|" + " --- |" * (len(keys) + 2)]
    for r in sorted(rows, key=lambda r: (r["bits"], r["window"])):
        lines.append(f"| {r['window']} | {r['bits']} | " + " | ".join(f"{r[k]:.4g}" if k in r else "-" for k in keys) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"overrides": args.overrides, "metric": metric.description, "linears": len(names), "rows": rows}
    result["damage"] = {str(b): {"mean": means[b].tolist(), "stderr": errors[b].tolist()} for b in bits[:-1]}
    atomic_write_json(args.out / "results.json", result)
    atomic_write_text(args.out / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
