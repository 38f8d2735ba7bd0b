"""A MetricLogger that records nothing (logger=none)."""

from __future__ import annotations

from typing import Any


class NullLogger:
    def start(self, run_dir: str, config: dict[str, Any], name: str) -> None:
        pass

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def finish(self, failed: bool = False) -> None:
        pass
