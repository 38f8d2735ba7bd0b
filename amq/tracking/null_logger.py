"""A MetricLogger that records nothing (logger=none): the run directory is the only record."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


class NullLogger:
    def start(self, run_dir: str, config: dict[str, Any], name: str) -> None:
        pass

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def log_front(self, front: list[dict[str, Any]], metric_name: str, image: Path | None, step: int) -> None:
        pass

    def log_image(self, key: str, image: Path, step: int) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        pass

    def log_finalize(self, output_dir: Path) -> None:
        pass

    def log_evaluations(self, results: Sequence[dict[str, Any]]) -> None:
        pass

    def finish(self, failed: bool = False) -> None:
        pass
