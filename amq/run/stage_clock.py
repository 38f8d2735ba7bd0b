"""Wall time and peak accelerator memory of each stage of a run, as the run itself measured them.

summary.json's `stages` holds them (load, reference, proxy_build, sensitivity, search, finalize),
so a run at scale reports what its real path cost, not what a projection says it would.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@dataclass
class StageClock:
    """Times named stages; on a GPU, each stage's peak allocated memory (its own, reset at its start)."""

    stages: dict[str, dict[str, float]] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        gpu = torch.cuda.is_available()
        _synchronize()
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _synchronize()
            record = {"seconds": round(time.perf_counter() - t0, 3)}
            if gpu:
                record["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            self.stages[name] = record
