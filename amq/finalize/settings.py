"""What the finalize stage exports and measures, checked before the search spends anything.

Kept apart from the stage itself (amq/finalize/stage.py), which needs transformers: a bad setting
here fails in the time it takes to read the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from amq.errors import ConfigError
from amq.evaluation.zeroshot import TaskSettings
from amq.finalize.selection import CONVENTIONS

if TYPE_CHECKING:
    from amq.search.space import SearchSpace


# Checkpoint formats besides amq's own (`amq-packed`, always written: amq reloads and evaluates it).
# compressed-tensors: a subfolder `compressed-tensors/` that plain transformers loads (amq/quantizers/compressed_tensors.py).
FORMATS = ("compressed-tensors",)


@dataclass(frozen=True)
class FinalizeSettings:
    """Which budgets to export and what to measure besides them."""

    targets: tuple[float, ...]
    bits_convention: str = "with_meta"  # or "weights_only": which average-bits figure the targets bound
    evaluate: bool = True
    extra_front_points: int = 2  # more front configs quantized and evaluated (not saved) for the fidelity check
    baselines: bool = True  # the unquantized model and uniform widths fitting the targets
    formats: tuple[str, ...] = ()  # standard checkpoints written next to amq's own (FORMATS)

    def __post_init__(self) -> None:
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown:
            raise ConfigError(
                "finalize.formats",
                f"unknown format {', '.join(map(repr, unknown))}",
                ", ".join(FORMATS) + " (or [] for amq's own only; a llama.cpp GGUF: amq-export <run> --format gguf after the search)",
            )
        if self.bits_convention not in CONVENTIONS:
            raise ConfigError("finalize.bits_convention", f"{self.bits_convention!r}", ", ".join(CONVENTIONS))
        if self.extra_front_points < 0:
            raise ConfigError("finalize.extra_front_points", f"{self.extra_front_points}", "an integer >= 0")

    def check_reachable(self, space: SearchSpace) -> None:
        """A target below the space's smallest configuration can never be met: say so before the search."""
        lo = space.bits_range()[0] - (space.meta_bits if self.bits_convention == "weights_only" else 0.0)
        low = [t for t in self.targets if t < lo - 1e-9]
        if low:
            raise ConfigError("finalize.targets", f"{low} below the smallest reachable {lo:.3f} average bits ({self.bits_convention})", f"targets >= {lo:.3f}")


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def task_settings(node: Any) -> TaskSettings:
    """The finalize node's lm-eval settings (`tasks`, `task_limit`, `num_fewshot`,
    `task_batch_size`), checked without importing lm-eval: a bad value fails before the search."""
    tasks = _plain(node.get("tasks")) or ()
    return TaskSettings(
        tasks if isinstance(tasks, str) else tuple(tasks),
        _plain(node.get("task_limit")),
        _plain(node.get("num_fewshot")),
        _plain(node.get("task_batch_size", TaskSettings.batch_size)),
    )
