"""The run-level evaluation table and the proxy-fidelity check (`evaluation.json`, `evaluation.md`)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from scipy import stats

from amq.io import atomic_write_json, atomic_write_text


def fidelity(rows: list[dict], proxy_key: str) -> dict:
    """Rank correlation between the proxy metric and each held-out perplexity over quantized rows.

    Only quantized configurations with a proxy value count (not the unquantized model), so the
    numbers say whether the search's ordering carries over to the deployed quantizer; each once (two
    targets that select one configuration, or a target and a uniform baseline, are one point).
    """
    pts = [r for r in rows if r["kind"] != "unquantized" and r.get(proxy_key) is not None and r.get("perplexity")]
    pts = list({(r["avg_bits"], r[proxy_key]): r for r in pts}.values())
    out: dict = {"n": len(pts), "proxy": proxy_key}
    if len(pts) < 3:
        out["note"] = "fewer than 3 quantized configurations with both numbers: no correlation reported"
        return out
    for name in pts[0]["perplexity"]:
        proxy = [r[proxy_key] for r in pts]
        ppl = [r["perplexity"][name] for r in pts]
        with warnings.catch_warnings():  # all-equal numbers: no correlation (None below), not a warning
            warnings.simplefilter("ignore", stats.ConstantInputWarning)
            rho = stats.spearmanr(proxy, ppl).statistic
            tau = stats.kendalltau(proxy, ppl).statistic
        out[name] = {"spearman": None if math.isnan(rho) else float(rho), "kendall_tau": None if math.isnan(tau) else float(tau)}
    return out


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) >= 10 else f"{v:.4g}"  # perplexities keep two decimals (33.00, not 33)
    return str(v)


def markdown_table(report: dict) -> str:
    rows = report["rows"]
    proxy_key = report["proxy_fidelity"]["proxy"]
    texts = sorted({k for r in rows for k in (r.get("perplexity") or {})})
    tasks = sorted({k for r in rows for k in (r.get("zero_shot") or {})})
    head = ["kind", "target", "avg bits", "weights-only bits", proxy_key] + [f"ppl {t}" for t in texts] + [f"acc {t}" for t in tasks] + ["MiB on disk"]
    lines = [f"# Evaluation: {report['model']} ({report['quantizer']['name']})", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in sorted(rows, key=lambda r: r["avg_bits"]):
        cells = [r["kind"], _fmt(r.get("target")), f"{r['avg_bits']:.3f}", f"{r['avg_bits_weights_only']:.3f}", _fmt(r.get(proxy_key))]
        cells += [_fmt((r.get("perplexity") or {}).get(t)) for t in texts]
        cells += [_fmt((r.get("zero_shot") or {}).get(t)) for t in tasks]
        cells.append(_fmt(r["bytes_on_disk"] / 2**20) if r.get("bytes_on_disk") else "-")
        lines.append("| " + " | ".join(cells) + " |")
    fid = report["proxy_fidelity"]
    lines += ["", f"Proxy fidelity over {fid['n']} quantized configurations (rank correlation of {proxy_key} with perplexity):"]
    for t in texts:
        if t in fid:
            lines.append(f"- {t}: Spearman {_fmt(fid[t]['spearman'])}, Kendall tau {_fmt(fid[t]['kendall_tau'])}")
    if "note" in fid:
        lines.append(f"- {fid['note']}")
    lines += ["", f"Bits convention of the targets: {report['bits_convention']}."]
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path, report: dict) -> None:
    atomic_write_json(run_dir / "evaluation.json", report)
    atomic_write_text(run_dir / "evaluation.md", markdown_table(report))
