"""front.png: every archived configuration and the Pareto front, metric against average bits."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from amq.io import atomic_write_bytes_with


def plot_front(
    path: str | Path,
    bits: np.ndarray,
    metric: np.ndarray,
    iterations: np.ndarray,
    front_idx: np.ndarray,
    metric_name: str,
    title: str,
    bits_label: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    finite = np.isfinite(metric)
    sc = ax.scatter(bits[finite], metric[finite], c=iterations[finite], s=12, cmap="viridis", alpha=0.7, label="archive")
    fig.colorbar(sc, ax=ax, label="iteration")
    order = front_idx[np.argsort(bits[front_idx])]
    ax.step(bits[order], metric[order], where="post", color="crimson", lw=1.5, marker="o", ms=4, label="Pareto front")
    ax.set_yscale("log")
    ax.set_xlabel(bits_label)
    ax.set_ylabel(f"{metric_name} (log scale, lower is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    atomic_write_bytes_with(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
