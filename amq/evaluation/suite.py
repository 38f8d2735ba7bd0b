"""What a finished model is measured on: held-out perplexity per text, and optional zero-shot tasks.

One `EvalSuite` is built per run (or per `amq-evaluate` call) so every model of a run is measured
on exactly the same windows with the same protocol, and the protocol (the data, how its held-out
text became windows, the window, the task settings) is written next to the numbers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amq.data.preparation import AMQ, HeldoutPreparation
from amq.errors import ConfigError
from amq.evaluation.perplexity import PerplexityProtocol, perplexity, perplexity_windows
from amq.evaluation.zeroshot import TaskSettings

log = logging.getLogger(__name__)


@dataclass
class EvalSuite:
    """Held-out texts (name -> documents), the perplexity protocol and the lm-eval task settings.

    `preparation` is how the held-out documents become windows (the data's, amq.data.preparation);
    `tasks` what lm-eval runs (no task: perplexity only).
    """

    heldout: dict[str, list[str]]
    data_description: str
    protocol: PerplexityProtocol
    tasks: TaskSettings = field(default_factory=TaskSettings)
    cache_dir: Path | None = None
    preparation: HeldoutPreparation = AMQ
    _windows: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _task_runner: Any = field(default=None, repr=False)  # amq.evaluation.zeroshot.TaskRunner, built once per suite

    def fitted(self, model: nn.Module) -> PerplexityProtocol:
        return self.protocol.fit_to(model)

    def windows(self, tokenizer: Any, model: nn.Module) -> dict[str, torch.Tensor]:
        if not self._windows:
            proto = self.fitted(model)
            prep = self.preparation
            if prep.paper_window is not None and not prep.is_paper_protocol(proto.window, proto.max_windows):
                log.warning(
                    "held-out preparation %s with %d-token windows%s: not the paper's protocol (%d-token windows, all of them: "
                    "finalize.window=%d finalize.max_windows=null)",
                    prep.name,
                    proto.window,
                    "" if proto.max_windows is None else f", at most {proto.max_windows} per text",
                    prep.paper_window,
                    prep.paper_window,
                )
            if proto.add_bos and not prep.window_bos:
                log.warning("held-out preparation %s: windows carry no BOS of their own, as the paper's, though the model wants one", prep.name)
            self._windows = {name: perplexity_windows(tokenizer, docs, proto, self.cache_dir, prep) for name, docs in self.heldout.items()}
        return self._windows

    def describe(self, model: nn.Module) -> dict:
        proto, prep = self.fitted(model), self.preparation
        perplexity = {
            **proto.describe(),
            "add_bos": proto.add_bos and prep.window_bos,
            "preparation": prep.describe(),
            "paper_protocol": prep.is_paper_protocol(proto.window, proto.max_windows),
        }
        tasks = self.tasks.describe() if self.tasks.tasks else {"tasks": [], "task_limit": self.tasks.limit}
        return {"data": self.data_description, "perplexity": perplexity, **tasks}

    def run(self, model: nn.Module, tokenizer: Any, label: str, keep_lm_eval: bool = False) -> dict:
        """Perplexity on every held-out text, then the zero-shot tasks (when any are configured).

        With `keep_lm_eval`, lm-eval's own results dict comes back under "lm_eval" (for
        LM_EVAL_RESULTS next to eval.json, amq.evaluation.zeroshot.write_lm_eval_results)."""
        out: dict[str, Any] = {"perplexity": {}}
        for name, w in self.windows(tokenizer, model).items():
            res = perplexity(model, w, f"{label}/{name}")
            log.info("%s: %s perplexity %.3f (%d tokens, %.1fs)", label, name, res["perplexity"], res["tokens"], res["seconds"])
            out["perplexity"][name] = res
        if self.tasks.tasks:
            from amq.evaluation.zeroshot import TaskRunner

            if self.cache_dir is None:
                raise ConfigError("paths.cache_dir", "zero-shot tasks need a cache folder for their task files", "a writable folder")
            if self._task_runner is None:
                self._task_runner = TaskRunner(self.tasks, Path(self.cache_dir))
            tasks = self._task_runner.run(model, tokenizer, add_bos_token=self.protocol.add_bos)
            out["zero_shot"] = tasks.rows
            if keep_lm_eval:
                out["lm_eval"] = tasks.lm_eval
        out["protocol"] = self.describe(model)
        out["environment"] = compute_environment(model)
        return out


def compute_environment(model: nn.Module) -> dict:
    """Where the numbers were computed. bf16 sums round differently with the thread count and the
    hardware (about 1e-3 in perplexity), so a re-check uses the recorded thread count by default."""
    device = next(model.parameters()).device
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": where, "threads": torch.get_num_threads(), "torch": torch.__version__}
