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

import contextlib
import copy
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from amq.errors import InvalidArgument
from amq.metrics.block_prefix import BlockPrefixCache, BlockStates, verify_prefix_reuse

log = logging.getLogger(__name__)

REFERENCES = ("probs", "hidden")
AUTO_REFERENCE = "auto"  # hidden on a GPU (where it saves memory and time; docs/benchmarks.md), probs elsewhere


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

    `trim` leaves the highest fraction of per-token divergences out of the mean (a trimmed mean):
    near the top widths a few tokens carry much of a mean KL (on SmolLM2 at 4.0 bits, the highest 1%
    of 2,048 tokens carry 7-11% of it, where near-ties differ by 1-3%). As a search objective a
    trimmed mean is blind to what it leaves out (docs/benchmarks.md, "A trimmed KL"): off by default.

    The divergence is computed in chunks of `chunk_tokens` rows so the float32 temporaries stay in
    cache; `compile=True` fuses the arithmetic with torch.compile (falls back to eager if the
    compiler is unavailable), which is what keeps a true evaluation close to the forward-pass floor.
    Per-chunk sums stay on the model's device until the end (one host sync per evaluation).

    After `reuse_prefix(blocks)`, a pass given the per-block states of the weights starts at the
    first block that changed since the previous pass (amq/metrics/block_prefix.py), keeping up to
    `prefix_cache_mb` of block inputs; the values are the full forward's, bit for bit.
    """

    model: nn.Module
    tokens: torch.Tensor
    kind: str = "jsd"
    batch_size: int = 4
    chunk_tokens: int = 64
    compile: bool = False
    reference: str = "probs"
    prefix_cache_mb: float = 1024.0
    trim: float = 0.0
    _refs: list = field(default_factory=list, init=False, repr=False)
    _blocks: nn.ModuleList | None = field(default=None, init=False, repr=False)
    _prefix: BlockPrefixCache | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in _ROW_FNS:
            raise InvalidArgument("kind", f"unknown divergence {self.kind!r}", ", ".join(_ROW_FNS))
        if self.reference == AUTO_REFERENCE:
            self.reference = self._auto_reference()
        if self.reference not in REFERENCES:
            raise InvalidArgument("reference", f"unknown reference storage {self.reference!r}", ", ".join((*REFERENCES, AUTO_REFERENCE)))
        for key in ("batch_size", "chunk_tokens"):
            if int(getattr(self, key)) < 1:
                raise InvalidArgument(key, f"{getattr(self, key)}", "an integer >= 1")
        if isinstance(self.trim, bool) or not isinstance(self.trim, (int, float)) or not 0 <= self.trim < 0.5:
            raise InvalidArgument("trim", f"{self.trim!r}", "a fraction in [0, 0.5): the share of highest per-token divergences left out of the mean (0: none)")
        if not float(self.prefix_cache_mb) >= 0:
            raise InvalidArgument("prefix_cache_mb", f"{self.prefix_cache_mb}", "a number of megabytes >= 0 (0: every pass runs in full)")
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

    def _auto_reference(self) -> str:
        """`hidden` on a GPU when the model's logits are its head applied to the last hidden state, else `probs`."""
        device = next(self.model.parameters()).device
        choice = "probs"
        if device.type == "cuda":
            try:
                with torch.inference_mode():
                    self._check_head_split()
                choice = "hidden"
            except InvalidArgument:
                pass
        log.info("metric reference auto: %s on %s", choice, device.type)
        return choice

    def _check_head_split(self) -> None:
        """`reference=hidden` assumes logits = head(last hidden state); refuse models where it isn't so."""
        ids = self.tokens[:1]
        full = forward_logits(self.model, ids).float()
        split = head_logits(self.model, final_hidden(self.model, ids)).float()
        err = float((full - split).norm() / full.norm().clamp_min(1e-12))
        if not err < 1e-2:
            raise InvalidArgument(
                "reference", f"hidden: this model's logits are not its output head applied to the last hidden state (relative error {err:.3g})", "probs"
            )

    def _compiled(self, fn: Callable) -> Callable:
        try:
            compiled = torch.compile(fn, dynamic=False)
            device = next(self.model.parameters()).device  # probe where it will run (its compiler, not the CPU's)
            probe, other = torch.randn(4, 16, device=device), torch.randn(4, 16, device=device)
            compiled(*reference_stats(probe), other) if self.reference == "probs" else compiled(probe, other)
            return compiled
        except Exception as exc:  # no compiler toolchain: eager is correct, only slower
            log.warning("compile: torch.compile unavailable (%s); using eager", type(exc).__name__)
            return fn

    @property
    def name(self) -> str:
        return self.kind

    @property
    def description(self) -> str:
        n, t = self.tokens.shape
        trimmed = f", the highest {100 * float(self.trim):.3g}% of tokens left out" if self.trim else ""
        return f"mean per-token {self.kind.upper()}{trimmed} (nats, float32) vs the unquantized model on {n}x{t} calibration tokens"

    def settings(self) -> dict:
        out = {"kind": self.kind, "batch_size": int(self.batch_size), "chunk_tokens": int(self.chunk_tokens), "compile": bool(self.compile)}
        if self.trim:  # only when set: the untrimmed metric keeps its cache keys
            out["trim"] = float(self.trim)
        return out

    def subset(self, n_samples: int) -> "OutputDivergence":
        """The same metric on the first `n_samples` windows, sharing the reference (no recompute).

        Exactly `n_samples` windows: a last partial batch takes the leading rows of its reference."""
        n_samples = max(1, min(int(n_samples), self.tokens.shape[0]))
        full, rest = divmod(n_samples, self.batch_size)
        sub = copy.copy(self)
        sub.tokens = self.tokens[:n_samples]
        sub._refs = self._refs[:full]
        if rest:
            rows = rest * self.tokens.shape[1]
            ref = self._refs[full]
            sub._refs.append(tuple(r[:rows] for r in ref) if isinstance(ref, tuple) else ref[:rows])
        sub._prefix = sub._new_prefix_cache() if self._prefix is not None and self._prefix.enabled else None
        return sub

    def reuse_prefix(self, blocks: nn.ModuleList) -> bool:
        """Let passes start at the first changed decoder block; checked once on this model.

        Returns whether reuse is on (off when `prefix_cache_mb` holds not even one block's inputs,
        or when skipping blocks does not reproduce the full forward on this architecture)."""
        self._blocks = blocks
        self._prefix = self._new_prefix_cache()
        if not self._prefix.enabled:
            self._prefix = None
            return False
        ids = self._batches()[0]
        with torch.inference_mode():
            ok = verify_prefix_reuse(self._prefix, lambda: forward_logits(self.model, ids) if self.reference == "probs" else final_hidden(self.model, ids))
        if not ok:
            self._prefix = None
        return ok

    def _new_prefix_cache(self) -> BlockPrefixCache:
        hidden = self.model.get_input_embeddings().embedding_dim
        itemsize = next(self.model.parameters()).element_size()
        per_block = self.tokens.numel() * hidden * itemsize
        return BlockPrefixCache(self._blocks, len(self._batches()), per_block, int(float(self.prefix_cache_mb) * 2**20))

    @property
    def prefix_stats(self) -> dict:
        """Blocks skipped and run over all passes so far (what prefix reuse saved)."""
        p = self._prefix
        return {"blocks_skipped": p.blocks_skipped if p else 0, "blocks_run": p.blocks_run if p else 0}

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

    def token_values(self, model: nn.Module, states: BlockStates | None = None) -> list[torch.Tensor]:
        """Per-token divergences (>= 0) of `model` as it is now, chunk by chunk, in window order;
        `states` (one per decoder block, e.g. the bits of its linears) lets the pass start at the
        first block that changed since the previous one."""
        prefix = self._prefix if model is self.model else None
        start = prefix.begin(states) if prefix is not None else 0
        chunks = []
        with torch.inference_mode():
            for i, (ids, ref) in enumerate(zip(self._batches(), self._refs)):
                with prefix.forward_from(i, start) if prefix is not None else contextlib.nullcontext():
                    chunks += [rows.clamp_min(0) for rows in self._batch_rows(model, ids, ref)]
        if prefix is not None:
            prefix.commit()
        return chunks

    def evaluate(self, model: nn.Module, states: BlockStates | None = None) -> float:
        """Score `model` as it is now: the (trimmed) mean of `token_values`."""
        return self.summarize(self.token_values(model, states))

    def evaluate_tokens(self, model: nn.Module, states: BlockStates | None = None) -> tuple[float, torch.Tensor]:
        """`evaluate` and the per-token values it summarizes (float64, on the CPU, in window order):
        the sensitivity stage estimates each probe's noise from them (amq/search/sensitivity.py)."""
        chunks = self.token_values(model, states)
        return self.summarize(chunks), torch.cat(chunks).double().cpu()

    def summarize(self, chunks: list[torch.Tensor]) -> float:
        """The metric's value from per-token divergences: their mean, or trimmed mean with `trim`."""
        if self.trim:
            return trimmed_mean(torch.cat(chunks), float(self.trim))
        return float(torch.stack([c.sum() for c in chunks]).double().sum()) / sum(c.numel() for c in chunks)


def trimmed_mean(values: torch.Tensor, trim: float) -> float:
    """Mean of `values` without their highest `trim` fraction (rounded down: at least one value stays)."""
    keep = values.numel() - int(trim * values.numel())
    low = torch.topk(values.flatten().double(), keep, largest=False).values
    return float(low.sum()) / keep
