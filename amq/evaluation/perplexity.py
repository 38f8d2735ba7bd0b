"""Perplexity on held-out text, on non-overlapping windows of a stated length.

The protocol (window length, BOS handling, how many windows, dtype) travels with every number,
because perplexities measured with different windows are not comparable.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from amq.data.preparation import AMQ, HeldoutPreparation
from amq.data.tokens import token_stream
from amq.errors import InvalidArgument

if TYPE_CHECKING:  # transformers is slow to import: settings errors come before it
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerplexityProtocol:
    """Non-overlapping windows of `window` tokens over the documents joined by blank lines.

    `max_windows` caps the work (None: all windows); the first windows are used, so runs with the
    same protocol see the same tokens. With `add_bos`, each window is BOS + (window - 1) text tokens.
    """

    window: int = 2048
    max_windows: int | None = 16
    add_bos: bool = False

    def __post_init__(self) -> None:
        if self.window < 16:
            raise InvalidArgument("window", f"{self.window} tokens", "an integer >= 16")
        if self.max_windows is not None and self.max_windows < 1:
            raise InvalidArgument("max_windows", f"{self.max_windows}", "an integer >= 1, or null for all windows")

    def fit_to(self, model: nn.Module) -> "PerplexityProtocol":
        """The same protocol with the window capped at the model's context length."""
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if limit and self.window > int(limit):
            log.info("perplexity window %d exceeds the model's context %d: using %d", self.window, limit, limit)
            return PerplexityProtocol(int(limit), self.max_windows, self.add_bos)
        return self

    def describe(self) -> dict:
        return {**asdict(self), "overlap": 0, "loss": "mean token NLL over all predicted tokens, exp()"}


def perplexity_windows(
    tokenizer: PreTrainedTokenizerBase,
    docs: list[str],
    protocol: PerplexityProtocol,
    cache_dir: str | Path | None = None,
    preparation: HeldoutPreparation = AMQ,
) -> torch.Tensor:
    """(n, window) token windows, laid end to end from the start of the text.

    `preparation` says how the text is tokenized and cut (amq.data.preparation): amq's rule puts
    BOS at the start of every window when the protocol asks for it; a paper's rule tokenizes with
    the tokenizer's special tokens once and cuts plain windows, at most its own `max_windows`.
    """
    stream = token_stream(tokenizer, docs, cache_dir, special_tokens=preparation.special_tokens)
    add_bos = protocol.add_bos and preparation.window_bos
    body = protocol.window - 1 if add_bos else protocol.window
    n = len(stream) // body
    if n == 0:
        raise InvalidArgument("window", f"the held-out text has {len(stream)} tokens, fewer than one window of {protocol.window}", "a shorter window")
    n = min([n] + [cap for cap in (protocol.max_windows, preparation.max_windows) if cap is not None])
    windows = stream[: n * body].view(n, body)
    if add_bos:
        windows = torch.cat([torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.long), windows], dim=1)
    return windows


@torch.no_grad()
def window_nll(model: nn.Module, ids: torch.Tensor, chunk: int = 512) -> tuple[float, int]:
    """Summed next-token NLL (float32) of one batch of windows and how many tokens it covers."""
    logits = model(input_ids=ids.to(next(model.parameters()).device)).logits[:, :-1]
    targets = ids[:, 1:].to(logits.device)
    total = 0.0
    for s in range(0, targets.shape[1], chunk):
        lg = logits[:, s : s + chunk].float()
        tg = targets[:, s : s + chunk]
        total += float(nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), tg.reshape(-1), reduction="sum"))
    return total, targets.numel()


def perplexity(model: nn.Module, windows: torch.Tensor, label: str = "") -> dict:
    """Perplexity of `model` on `windows` (one window per forward pass), with tokens and seconds."""
    t0, t_log = time.perf_counter(), time.perf_counter()
    nll, count = 0.0, 0
    was_training = model.training
    model.eval()
    for i in range(len(windows)):
        s, c = window_nll(model, windows[i : i + 1])
        nll, count = nll + s, count + c
        if time.perf_counter() - t_log > 15:
            log.info("perplexity %s: %d/%d windows", label, i + 1, len(windows))
            t_log = time.perf_counter()
    model.train(was_training)
    mean = nll / count
    return {
        "perplexity": math.exp(mean) if mean < 700 else math.inf,
        "nll": mean,
        "tokens": count,
        "windows": len(windows),
        "seconds": time.perf_counter() - t0,
    }
