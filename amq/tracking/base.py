"""The MetricLogger interface every tracker implements."""

from __future__ import annotations

from typing import Any, Protocol


class MetricLogger(Protocol):
    def start(self, run_dir: str, config: dict[str, Any], name: str) -> None: ...

    def log(self, metrics: dict[str, Any], step: int) -> None: ...

    def summary(self, values: dict[str, Any]) -> None: ...

    def finish(self, failed: bool = False) -> None: ...
