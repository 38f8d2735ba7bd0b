"""The MetricLogger interface every tracker implements.

The search talks to trackers only through this protocol, so W&B (or anything else) stays an
option: `logger=none` swaps in a logger that records nothing, and the run directory remains the
complete record either way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, Sequence


class MetricLogger(Protocol):
    def start(self, run_dir: str, config: dict[str, Any], name: str) -> None:
        """Open the run; `config` is the resolved configuration as plain containers."""

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """One iteration's metrics row (`/`-separated names), the iteration as step."""

    def log_front(self, front: list[dict[str, Any]], metric_name: str, image: Path | None, step: int) -> None:
        """The current Pareto front (rows of front.json) and its plot (front.png)."""

    def log_image(self, key: str, image: Path, step: int) -> None:
        """A plot of the run directory (predictor.png) under `key`."""

    def summary(self, values: dict[str, Any]) -> None:
        """Final values shown on the run's overview (hypervolume, best per target, timings)."""

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        """Attach the run's result files (archive, front, sensitivity, summary) and, when the search's
        finalize stage ran, its evaluation and exported models (as `log_finalize`)."""

    def log_finalize(self, output_dir: Path) -> None:
        """The finalize stage's results in `output_dir` (evaluation.json, its charts, models/<target>/)."""

    def log_evaluations(self, results: Sequence[dict[str, Any]]) -> None:
        """amq-evaluate's results, one eval.json per re-measured model."""

    def finish(self, failed: bool = False) -> None:
        """Close the run; always called, also when the search raised."""
