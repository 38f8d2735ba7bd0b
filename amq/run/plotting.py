"""The search's plots: front.png and predictor.png.

front.png: every archived configuration and the Pareto front, metric against average bits. The
front alone says little without its references, so the plot also marks the search targets (where
the reports and finalize pick their configurations) and the uniform configurations (every
searchable linear at one width: what the search has to beat).

predictor.png: what the predictor said of each configuration it proposed, against what the true
evaluation measured, coloured by iteration: how far to trust the predictor, and whether it learns.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Sequence

import numpy as np

from amq.io import atomic_write_bytes_with

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.axis import Axis
    from matplotlib.figure import Figure


class UniformPoint(NamedTuple):
    """A uniform configuration of the archive: its width, average bits and metric."""

    width: int
    avg_bits: float
    metric: float


def new_figure(figsize: tuple[float, float] = (7, 4.5)) -> tuple[Figure, Axes]:
    """A figure on the Agg backend: runs write plots on machines without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize, dpi=110)


def save_figure(fig: Figure, path: str | Path) -> None:
    """Write the figure as PNG atomically (a reader never sees half a file), then free it."""
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        atomic_write_bytes_with(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


def label_point(ax: Axes, text: str, x: float, y: float) -> None:
    """A small label beside a point, on the side facing the middle so it stays inside the axes.
    Call it once the data are drawn (it reads the x limits)."""
    lo, hi = ax.get_xlim()
    right_half = x > (lo + hi) / 2 if ax.get_xscale() == "linear" else x > (lo * hi) ** 0.5
    ax.annotate(text, (x, y), xytext=(-5 if right_half else 5, 4), textcoords="offset points", ha="right" if right_half else "left", fontsize=7)


def plain_log_ticks(axis: Axis) -> None:
    """Tick labels of a log axis as plain numbers (30, 0.05), not 3x10^1: perplexities read better."""
    from matplotlib.ticker import LogFormatter

    axis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.5)))


def mark_targets(ax: Axes, targets: Sequence[float]) -> None:
    """Dashed vertical lines at the bit budgets, each labelled at the foot of the axes (the low-bits
    corner a front leaves empty)."""
    for t in targets:
        ax.axvline(t, color="0.35", ls="--", lw=1, zorder=1)
        ax.text(t, 0.02, f"target {t:g} ", transform=ax.get_xaxis_transform(), rotation=90, va="bottom", ha="right", fontsize=7, color="0.25")


def plot_front(
    path: str | Path,
    bits: np.ndarray,
    metric: np.ndarray,
    iterations: np.ndarray,
    front_idx: np.ndarray,
    metric_name: str,
    title: str,
    bits_label: str,
    targets: Sequence[float] = (),
    uniform: Sequence[UniformPoint] = (),
) -> None:
    """The archive coloured by iteration and its front, against the targets and uniform widths."""
    fig, ax = new_figure()
    finite = np.isfinite(metric)
    sc = ax.scatter(bits[finite], metric[finite], c=iterations[finite], s=12, cmap="viridis", alpha=0.7, label="archive")
    fig.colorbar(sc, ax=ax, label="iteration")
    order = front_idx[np.argsort(bits[front_idx])]
    ax.step(bits[order], metric[order], where="post", color="crimson", lw=1.5, marker="o", ms=4, label="Pareto front")
    if uniform:
        ax.scatter(
            [u.avg_bits for u in uniform],
            [u.metric for u in uniform],
            marker="D",
            s=45,
            facecolors="none",
            edgecolors="black",
            lw=1.3,
            zorder=4,
            label="uniform width",
        )
    mark_targets(ax, targets)
    for u in uniform:
        label_point(ax, f"uniform {u.width}-bit", u.avg_bits, u.metric)
    ax.set_yscale("log")
    ax.set_xlabel(bits_label)
    ax.set_ylabel(f"{metric_name} (log scale, lower is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    save_figure(fig, path)


def plot_predictions(path: str | Path, predicted: np.ndarray, measured: np.ndarray, iterations: np.ndarray, metric_name: str, title: str) -> None:
    """Predicted against measured metric (log-log, with the line of perfect prediction); the last
    iteration's configurations are ringed."""
    fig, ax = new_figure((5.5, 5))
    sc = ax.scatter(measured, predicted, c=iterations, s=14, cmap="viridis", alpha=0.8)
    fig.colorbar(sc, ax=ax, label="iteration proposed", ticks=np.unique(iterations))
    last = iterations == iterations.max()
    ax.scatter(measured[last], predicted[last], s=60, facecolors="none", edgecolors="crimson", lw=1.2, label=f"iteration {int(iterations.max())}")
    lo = float(min(measured.min(), predicted.min()))
    hi = float(max(measured.max(), predicted.max()))
    ax.plot([lo, hi], [lo, hi], color="grey", ls="--", lw=1, label="predicted = measured")
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain_log_ticks(ax.xaxis)
    plain_log_ticks(ax.yaxis)
    ax.tick_params(axis="x", which="minor", labelrotation=45, labelsize=7)
    ax.set_xlabel(f"measured {metric_name}")
    ax.set_ylabel(f"predicted {metric_name} (when proposed)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    save_figure(fig, path)
