"""What a finished model is measured on: held-out perplexity per text, and optional zero-shot tasks.

One `EvalSuite` is built per run (or per `amq-evaluate` call) so every model of a run is measured
on exactly the same windows with the same protocol, and the protocol is written next to the numbers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from amq.errors import ConfigError
from amq.evaluation.perplexity import PerplexityProtocol, perplexity, perplexity_windows

log = logging.getLogger(__name__)


@dataclass
class EvalSuite:
    """Held-out texts (name -> documents), the perplexity protocol and zero-shot task names."""

    heldout: dict[str, list[str]]
    data_description: str
    protocol: PerplexityProtocol
    tasks: Sequence[str] = ()
    task_limit: int | None = None
    cache_dir: Path | None = None
    _windows: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def fitted(self, model: nn.Module) -> PerplexityProtocol:
        return self.protocol.fit_to(model)

    def windows(self, tokenizer: Any, model: nn.Module) -> dict[str, torch.Tensor]:
        if not self._windows:
            proto = self.fitted(model)
            self._windows = {name: perplexity_windows(tokenizer, docs, proto, self.cache_dir) for name, docs in self.heldout.items()}
        return self._windows

    def describe(self, model: nn.Module) -> dict:
        return {"data": self.data_description, "perplexity": self.fitted(model).describe(), "tasks": list(self.tasks), "task_limit": self.task_limit}

    def run(self, model: nn.Module, tokenizer: Any, label: str) -> dict:
        """Perplexity on every held-out text, then the zero-shot tasks (when any are configured)."""
        out: dict[str, Any] = {"perplexity": {}}
        for name, w in self.windows(tokenizer, model).items():
            res = perplexity(model, w, f"{label}/{name}")
            log.info("%s: %s perplexity %.3f (%d tokens, %.1fs)", label, name, res["perplexity"], res["tokens"], res["seconds"])
            out["perplexity"][name] = res
        if self.tasks:
            from amq.evaluation.zeroshot import zero_shot

            if self.cache_dir is None:
                raise ConfigError("paths.cache_dir", "zero-shot tasks need a cache folder for their task files", "a writable folder")
            out["zero_shot"] = zero_shot(model, tokenizer, list(self.tasks), self.cache_dir, limit=self.task_limit, add_bos_token=self.protocol.add_bos)
        out["protocol"] = self.describe(model)
        out["environment"] = compute_environment(model)
        return out


def compute_environment(model: nn.Module) -> dict:
    """Where the numbers were computed. bf16 sums round differently with the thread count and the
    hardware (about 1e-3 in perplexity), so a re-check uses the recorded thread count by default."""
    device = next(model.parameters()).device
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": where, "threads": torch.get_num_threads(), "torch": torch.__version__}
