"""Turn documents into token windows: seeded random windows of the calibration text.

Tokenizing a corpus takes seconds (one long string, one thread), and every run, finalize and
re-evaluation needs the same streams again; with a `cache_dir` they are kept under
`<cache_dir>/tokens/`, keyed by the tokenizer's full definition and the text.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from amq.errors import InvalidArgument, require_at_least
from amq.io import atomic_write_bytes_with

log = logging.getLogger(__name__)

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


def _cache_key(tokenizer: PreTrainedTokenizerBase, text: str, special_tokens: bool = False) -> str | None:
    """What the token ids depend on: the tokenizer's whole definition, the text and whether special
    tokens are added (None: a tokenizer without a serialisable definition, not cached)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    h = hashlib.sha256(backend.to_str().encode())
    h.update(type(tokenizer).__name__.encode())
    h.update(text.encode())
    if special_tokens:  # only then: the keys of streams cached without them stay valid
        h.update(b"\0special_tokens")
    return h.hexdigest()[:32]


def token_stream(tokenizer: PreTrainedTokenizerBase, docs: list[str], cache_dir: str | Path | None = None, special_tokens: bool = False) -> torch.Tensor:
    """All documents joined by blank lines and tokenised once (kept under `cache_dir`/tokens when
    given); with `special_tokens`, as `tokenizer(text)` does by default (GPTQ's evaluation text:
    BOS once at the start for Llama-style tokenizers), else without any."""
    text = DOC_SEPARATOR.join(d for d in docs if d.strip())
    if not text.strip():
        raise InvalidArgument("docs", "the calibration text is empty", "a corpus with at least one non-empty document")
    key = _cache_key(tokenizer, text, special_tokens) if cache_dir is not None else None
    path = Path(cache_dir) / "tokens" / f"{key}.pt" if key is not None else None
    if path is not None and path.is_file():
        try:
            return torch.load(path).long()
        except (OSError, RuntimeError, EOFError):
            log.warning("token cache %s is unreadable; tokenizing again", path.name)
    ids = torch.tensor(tokenizer(text, add_special_tokens=special_tokens, return_attention_mask=False)["input_ids"], dtype=torch.long)
    if path is not None:
        atomic_write_bytes_with(path, lambda tmp: torch.save(ids.int(), tmp))
    return ids


def calibration_windows(
    tokenizer: PreTrainedTokenizerBase, docs: list[str], spec: CalibrationSpec, add_bos: bool, cache_dir: str | Path | None = None
) -> torch.Tensor:
    """`n_samples` windows of `seq_len` tokens at seeded random offsets (BOS first when the model wants it)."""
    stream = token_stream(tokenizer, docs, cache_dir)
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
