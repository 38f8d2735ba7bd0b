"""Turn documents into token windows: seeded random windows of the calibration text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from amq.errors import InvalidArgument, require_at_least

if TYPE_CHECKING:  # transformers is slow to import: settings errors come before it
    from transformers import PreTrainedTokenizerBase

DOC_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class CalibrationSpec:
    """How many windows of how many tokens the search measures quality on."""

    n_samples: int
    seq_len: int
    seed: int = 0

    def __post_init__(self) -> None:
        require_at_least(self, "n_samples", 1, "{value} calibration samples")
        require_at_least(self, "seq_len", 8, "{value} tokens per sample")


def token_stream(tokenizer: PreTrainedTokenizerBase, docs: list[str]) -> torch.Tensor:
    """All documents joined by blank lines and tokenised once, without special tokens."""
    text = DOC_SEPARATOR.join(d for d in docs if d.strip())
    if not text.strip():
        raise InvalidArgument("docs", "the calibration text is empty", "a corpus with at least one non-empty document")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(tokenizer: PreTrainedTokenizerBase, docs: list[str], spec: CalibrationSpec, add_bos: bool) -> torch.Tensor:
    """`n_samples` windows of `seq_len` tokens at seeded random offsets (BOS first when the model wants it)."""
    stream = token_stream(tokenizer, docs)
    body = spec.seq_len - 1 if add_bos else spec.seq_len
    if len(stream) <= body:
        raise InvalidArgument(
            "seq_len",
            f"the calibration text has {len(stream)} tokens, fewer than one window of {spec.seq_len}",
            "a shorter seq_len or more calibration text",
        )
    rng = np.random.default_rng(spec.seed)
    starts = rng.integers(0, len(stream) - body, size=spec.n_samples)
    windows = torch.stack([stream[s : s + body] for s in starts])
    if add_bos:
        bos = torch.full((spec.n_samples, 1), tokenizer.bos_token_id, dtype=torch.long)
        windows = torch.cat([bos, windows], dim=1)
    return windows
