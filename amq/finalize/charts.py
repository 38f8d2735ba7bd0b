"""Charts of the finalize stage, drawn from evaluation.json's rows, next to it in the run directory.

perplexity_vs_bits.png: what the deployed models cost and give (held-out perplexity against
average bits), the exported models against the uniform widths and the unquantized model.
proxy_vs_perplexity.png: whether the search's proxy metric predicted the measured quality (the
picture behind the rank correlations of `proxy_fidelity`).

A report without evaluations (finalize.evaluate=false) or with too few points writes no chart:
that is logged, never an error, since the models and evaluation.json are the stage's results.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from amq.bits import CONVENTION_WITH_META
from amq.run.plotting import label_point, mark_targets, new_figure, plain_log_ticks, save_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes

log = logging.getLogger(__name__)

PERPLEXITY_VS_BITS = "perplexity_vs_bits.png"
PROXY_VS_PERPLEXITY = "proxy_vs_perplexity.png"
MIN_BITS_POINTS = 2  # quantized rows with a perplexity: fewer draw no trade-off
MIN_PROXY_POINTS = 3  # as evaluation.report.fidelity: fewer say nothing about the ranking

# How each kind of quantized row is drawn (evaluation.json's `kind`); the colour is the text's.
KIND_STYLE: dict[str, dict[str, Any]] = {
    "target": {"marker": "*", "s": 140, "label": "exported model (target)"},
    "front": {"marker": "o", "s": 40, "label": "front point"},
    "uniform": {"marker": "s", "s": 45, "label": "uniform width"},
}


def write_charts(report: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """Write the charts the report has points for into `out_dir`; returns the paths written."""
    out_dir = Path(out_dir)
    written = []
    for name, draw in ((PERPLEXITY_VS_BITS, _perplexity_vs_bits), (PROXY_VS_PERPLEXITY, _proxy_vs_perplexity)):
        if draw(report, out_dir / name):
            written.append(out_dir / name)
    return written


def _texts(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return sorted({t for r in rows for t in (r.get("perplexity") or {})})


def _quantized(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in rows if r.get("kind") in KIND_STYLE and r.get("perplexity")]


def _proxy_key(report: Mapping[str, Any]) -> str | None:
    """The proxy column: named by proxy_fidelity, else the rows' one `proxy_<metric>` key."""
    key = (report.get("proxy_fidelity") or {}).get("proxy")
    if key:
        return key
    keys = sorted({k for r in report.get("rows", []) for k in r if k.startswith("proxy_")})
    return keys[0] if len(keys) == 1 else None


def _title(report: Mapping[str, Any], what: str) -> str:
    quantizer = (report.get("quantizer") or {}).get("name")
    return f"{report.get('model', '?')}" + (f" ({quantizer})" if quantizer else "") + f": {what}"


def _skip(path: Path, why: str) -> bool:
    log.info("no %s: %s", path.name, why)
    return False


def _legend(ax: Axes, texts: Sequence[str], kinds: Sequence[str], colors: Sequence[str], extra: Sequence[tuple[str, dict]] = ()) -> None:
    """One entry per held-out text (its colour) and per kind of row (its marker), not their product."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, lw=2, label=t) for t, c in zip(texts, colors)]
    for k in kinds:
        st = KIND_STYLE[k]
        handles.append(Line2D([], [], ls="", marker=st["marker"], ms=st["s"] ** 0.5, color="0.3", label=st["label"]))
    handles += [Line2D([], [], label=label, **style) for label, style in extra]
    ax.legend(handles=handles, fontsize=8, loc="best")


def _colors(n: int) -> list[str]:
    return [f"C{i % 10}" for i in range(n)]


def _perplexity_vs_bits(report: Mapping[str, Any], path: Path) -> bool:
    rows = report.get("rows") or []
    quant = _quantized(rows)
    if len(quant) < MIN_BITS_POINTS:
        return _skip(path, f"{len(quant)} quantized configuration(s) with a held-out perplexity (needs {MIN_BITS_POINTS})")
    texts = _texts(quant)
    colors = _colors(len(texts))
    kinds = [k for k in KIND_STYLE if any(r["kind"] == k for r in quant)]
    fig, ax = new_figure((7.5, 4.8))
    for text, color in zip(texts, colors):
        has = [r for r in quant if text in r["perplexity"]]
        # the searched configurations (targets and front points) as one curve, the uniform widths as another
        for kinds_of_line, ls in ((("target", "front"), "-"), (("uniform",), "--")):
            line = sorted((r for r in has if r["kind"] in kinds_of_line), key=lambda r: r["avg_bits"])
            if len(line) > 1:
                ax.plot([r["avg_bits"] for r in line], [r["perplexity"][text] for r in line], color=color, ls=ls, lw=1, alpha=0.6)
        for kind in kinds:
            pts = [r for r in has if r["kind"] == kind]
            ax.scatter([r["avg_bits"] for r in pts], [r["perplexity"][text] for r in pts], color=color, zorder=3, **_no_label(KIND_STYLE[kind]))
        base = [r["perplexity"][text] for r in rows if r.get("kind") == "unquantized" and text in (r.get("perplexity") or {})]
        if base:
            ax.axhline(base[0], color=color, ls=":", lw=1.2)
    mark_targets(ax, sorted({float(r["target"]) for r in quant if r.get("target") is not None}))
    ax.set_yscale("log")
    plain_log_ticks(ax.yaxis)
    for r in quant:
        if r["kind"] == "uniform":
            for text in r["perplexity"]:
                label_point(ax, f"{r['avg_bits_weights_only']:.0f}-bit", r["avg_bits"], r["perplexity"][text])
    ax.set_xlabel(f"average bits ({CONVENTION_WITH_META})", fontsize=8)
    ax.set_ylabel("held-out perplexity (log scale, lower is better)")
    ax.set_title(_title(report, "held-out perplexity vs bits"), fontsize=10)
    ax.grid(alpha=0.3)
    unquantized = any(r.get("kind") == "unquantized" and r.get("perplexity") for r in rows)
    _legend(ax, texts, kinds, colors, [("unquantized", {"color": "0.3", "ls": ":"})] if unquantized else [])
    save_figure(fig, path)
    log.info("wrote %s (%d configurations, %d held-out text(s))", path.name, len(quant), len(texts))
    return True


def _proxy_vs_perplexity(report: Mapping[str, Any], path: Path) -> bool:
    key = _proxy_key(report)
    if key is None:
        return _skip(path, "the report names no proxy metric")
    # the unquantized model is left out: its proxy is 0 by definition, not a prediction
    pts = [r for r in _quantized(report.get("rows") or []) if r.get(key) is not None]
    if len(pts) < MIN_PROXY_POINTS:
        return _skip(path, f"{len(pts)} quantized configuration(s) with both {key} and a held-out perplexity (needs {MIN_PROXY_POINTS})")
    texts = _texts(pts)
    colors = _colors(len(texts))
    kinds = [k for k in KIND_STYLE if any(r["kind"] == k for r in pts)]
    fidelity = report.get("proxy_fidelity") or {}
    fig, ax = new_figure()
    for text, color in zip(texts, colors):
        for kind in kinds:
            sel = [r for r in pts if r["kind"] == kind and text in r["perplexity"]]
            ax.scatter([r[key] for r in sel], [r["perplexity"][text] for r in sel], color=color, zorder=3, **_no_label(KIND_STYLE[kind]))
    if all(r[key] > 0 for r in pts):
        ax.set_xscale("log")
        plain_log_ticks(ax.xaxis)
    ax.set_yscale("log")
    plain_log_ticks(ax.yaxis)
    ax.set_xlabel(f"{key} (the search's prediction, lower is better)")
    ax.set_ylabel("measured held-out perplexity (log scale)")
    ax.set_title(_title(report, f"{key} vs measured perplexity"), fontsize=10)
    ax.grid(alpha=0.3)
    _legend(ax, [_with_rank(t, fidelity.get(t)) for t in texts], kinds, colors)
    save_figure(fig, path)
    log.info("wrote %s (%d configurations)", path.name, len(pts))
    return True


def _with_rank(text: str, corr: Mapping[str, Any] | None) -> str:
    rho = (corr or {}).get("spearman")
    return f"{text} (Spearman {rho:.2f})" if rho is not None else text


def _no_label(style: Mapping[str, Any]) -> dict[str, Any]:
    """A kind's marker style without its label (the legend is built once, by `_legend`)."""
    return {k: v for k, v in style.items() if k != "label"}
