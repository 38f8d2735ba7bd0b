"""Output-distribution divergence against the unquantized model (AMQ's search metric).

The reference distributions are computed once from the unquantized model on the calibration
windows and kept in memory; every candidate then costs one forward pass. All arithmetic is float32.

How the reference is kept (`reference`):
- `probs`: its float32 probabilities, tokens x vocabulary x 4 bytes (33.5 GB for 128 x 2048
  tokens at a 32k vocabulary). Fastest where that fits.
- `hidden`: the final hidden states (tokens x hidden size, in the model's dtype: 2.1 GB for the
  same tokens at hidden size 4096); the reference logits are recomputed chunk by chunk through the
  output head, which costs one extra head matmul per token, a few percent of a forward pass.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from amq.errors import ConfigError

log = logging.getLogger(__name__)

REFERENCES = ("probs", "hidden")


def forward_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits for `ids` (no KV cache: the metric never decodes)."""
    return model(input_ids=ids.to(model.device), use_cache=False).logits


def final_hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """What the output head reads: the base model's last hidden state (after its final norm)."""
    return model.base_model(input_ids=ids.to(model.device), use_cache=False).last_hidden_state


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from final hidden states: the output head, then the final soft-cap where the model has one."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def reference_stats(ref_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference probabilities and their negative entropy (float32), as the row functions take them."""
    lp = torch.log_softmax(ref_logits.float(), dim=-1)
    p = lp.exp()
    return p, (p * lp).sum(-1)


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


def _from_ref_logits(row_fn: Callable) -> Callable:
    """A row function of (reference logits, candidate logits), for `reference=hidden`."""

    def rows(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return row_fn(*reference_stats(ref_logits), logits)

    return rows


@dataclass
class OutputDivergence:
    """Mean per-token JSD (or KL(ref || candidate)) over the calibration windows.

    The divergence is computed in chunks of `chunk_tokens` rows so the float32 temporaries stay in
    cache; `compile=True` fuses the arithmetic with torch.compile (falls back to eager if the
    compiler is unavailable), which is what keeps a true evaluation close to the forward-pass floor.
    Per-chunk sums stay on the model's device until the end (one host sync per evaluation).
    """

    model: nn.Module
    tokens: torch.Tensor
    kind: str = "jsd"
    batch_size: int = 4
    chunk_tokens: int = 64
    compile: bool = False
    reference: str = "probs"
    _refs: list = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in _ROW_FNS:
            raise ConfigError("metric.kind", f"unknown divergence {self.kind!r}", ", ".join(_ROW_FNS))
        if self.reference not in REFERENCES:
            raise ConfigError("metric.reference", f"unknown reference storage {self.reference!r}", ", ".join(REFERENCES))
        for key in ("batch_size", "chunk_tokens"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"metric.{key}", f"{getattr(self, key)}", "an integer >= 1")
        row_fn = _ROW_FNS[self.kind] if self.reference == "probs" else _from_ref_logits(_ROW_FNS[self.kind])
        self._row_fn = self._compiled(row_fn) if self.compile else row_fn
        with torch.inference_mode():
            if self.reference == "hidden":
                self._check_head_split()
            for ids in self._batches():
                if self.reference == "probs":
                    self._refs.append(reference_stats(forward_logits(self.model, ids).flatten(0, 1)))
                else:
                    self._refs.append(final_hidden(self.model, ids).flatten(0, 1))

    def _check_head_split(self) -> None:
        """`reference=hidden` assumes logits = head(last hidden state); refuse models where it isn't so."""
        ids = self.tokens[:1]
        full = forward_logits(self.model, ids).float()
        split = head_logits(self.model, final_hidden(self.model, ids)).float()
        err = float((full - split).norm() / full.norm().clamp_min(1e-12))
        if not err < 1e-2:
            raise ConfigError(
                "metric.reference", f"hidden: this model's logits are not its output head applied to the last hidden state (relative error {err:.3g})", "probs"
            )

    def _compiled(self, fn: Callable) -> Callable:
        try:
            compiled = torch.compile(fn, dynamic=False)
            device = next(self.model.parameters()).device  # probe where it will run (its compiler, not the CPU's)
            probe, other = torch.randn(4, 16, device=device), torch.randn(4, 16, device=device)
            compiled(*reference_stats(probe), other) if self.reference == "probs" else compiled(probe, other)
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

    def _batch_rows(self, model: nn.Module, ids: torch.Tensor, ref) -> list[torch.Tensor]:
        """Per-token divergences of one batch, chunk by chunk."""
        out = []
        if self.reference == "probs":
            p, neg_h = ref
            logits = forward_logits(model, ids).flatten(0, 1)
            for s in range(0, logits.shape[0], self.chunk_tokens):
                e = s + self.chunk_tokens
                out.append(self._row_fn(p[s:e].to(logits.device), neg_h[s:e].to(logits.device), logits[s:e]))
        else:
            hidden = final_hidden(model, ids).flatten(0, 1)
            for s in range(0, hidden.shape[0], self.chunk_tokens):
                e = s + self.chunk_tokens
                out.append(self._row_fn(head_logits(model, ref[s:e]), head_logits(model, hidden[s:e])))
        return out

    def evaluate(self, model: nn.Module) -> float:
        sums, count = [], 0
        with torch.inference_mode():
            for ids, ref in zip(self._batches(), self._refs):
                for rows in self._batch_rows(model, ids, ref):
                    sums.append(rows.clamp_min(0).sum())
                    count += rows.numel()
        return float(torch.stack(sums).double().sum()) / count
