"""Output-distribution divergence against the unquantized model (AMQ's search metric).

The reference distributions are computed once from the unquantized model on the calibration
windows and kept in memory; every candidate then costs one forward pass. All arithmetic is float32.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from amq.errors import ConfigError

log = logging.getLogger(__name__)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids.to(model.device)).logits


def jsd_rows(ref_p: torch.Tensor, ref_neg_entropy: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-row JSD(ref || candidate) in nats, float32.

    Uses JSD = (sum p log p + sum q log q) / 2 - sum m log m with m = (p + q) / 2, which needs the
    reference only as probabilities and their negative entropy (precomputed once).
    """
    lq = torch.log_softmax(logits.float(), dim=-1)
    q = lq.exp()
    m = (q + ref_p) * 0.5
    return 0.5 * (ref_neg_entropy + (q * lq).sum(-1)) - (m * m.log()).sum(-1)


def kl_rows(ref_p: torch.Tensor, ref_neg_entropy: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-row KL(ref || candidate) in nats, float32."""
    lq = torch.log_softmax(logits.float(), dim=-1)
    return ref_neg_entropy - (ref_p * lq).sum(-1)


_ROW_FNS = {"jsd": jsd_rows, "kl": kl_rows}


@dataclass
class OutputDivergence:
    """Mean per-token JSD (or KL(ref || candidate)) over the calibration windows.

    The divergence is computed in chunks of `chunk_tokens` rows so the float32 temporaries stay in
    cache; `compile=True` fuses the arithmetic with torch.compile (falls back to eager if the
    compiler is unavailable), which is what keeps a true evaluation close to the forward-pass floor.
    """

    model: nn.Module
    tokens: torch.Tensor
    kind: str = "jsd"
    batch_size: int = 4
    chunk_tokens: int = 64
    compile: bool = False
    _refs: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in _ROW_FNS:
            raise ConfigError("metric.kind", f"unknown divergence {self.kind!r}", ", ".join(_ROW_FNS))
        for key in ("batch_size", "chunk_tokens"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"metric.{key}", f"{getattr(self, key)}", "an integer >= 1")
        self._row_fn = _ROW_FNS[self.kind]
        if self.compile:
            self._row_fn = self._compiled(self._row_fn)
        with torch.inference_mode():
            for ids in self._batches():
                lp = torch.log_softmax(_logits(self.model, ids).float(), dim=-1).flatten(0, 1)
                p = lp.exp()
                self._refs.append((p, (p * lp).sum(-1)))

    @staticmethod
    def _compiled(fn):
        try:
            compiled = torch.compile(fn, dynamic=False)
            probe = torch.softmax(torch.randn(4, 16), -1)
            compiled(probe, (probe * probe.log()).sum(-1), torch.randn(4, 16))
            return compiled
        except Exception as exc:  # no compiler toolchain: eager is correct, only slower
            log.warning("metric.compile: torch.compile unavailable (%s); using eager", type(exc).__name__)
            return fn

    @property
    def name(self) -> str:
        return self.kind

    @property
    def description(self) -> str:
        n, t = self.tokens.shape
        return f"mean per-token {self.kind.upper()} (nats, float32) vs the unquantized model on {n}x{t} calibration tokens"

    def settings(self) -> dict:
        return {"kind": self.kind, "batch_size": int(self.batch_size), "chunk_tokens": int(self.chunk_tokens), "compile": bool(self.compile)}

    def subset(self, n_samples: int) -> "OutputDivergence":
        """The same metric on the first `n_samples` windows, sharing the reference (no recompute)."""
        n_batches = max(1, -(-n_samples // self.batch_size))
        sub = copy.copy(self)
        sub.tokens = self.tokens[: n_batches * self.batch_size]
        sub._refs = self._refs[:n_batches]
        return sub

    def _batches(self) -> list[torch.Tensor]:
        return list(torch.split(self.tokens, self.batch_size))

    def evaluate(self, model: nn.Module) -> float:
        total, count = 0.0, 0
        with torch.inference_mode():
            for ids, (p, neg_h) in zip(self._batches(), self._refs):
                logits = _logits(model, ids).flatten(0, 1)
                for s in range(0, logits.shape[0], self.chunk_tokens):
                    e = s + self.chunk_tokens
                    rows = self._row_fn(p[s:e].to(logits.device), neg_h[s:e].to(logits.device), logits[s:e])
                    total += float(rows.clamp_min(0).sum())
                    count += rows.numel()
        return total / count
