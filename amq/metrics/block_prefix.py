"""Start a forward pass at the first decoder block whose weights changed since the last pass.

A sensitivity probe changes one linear, and consecutive search candidates often share their first
blocks: the blocks before the first change compute exactly what they computed last time. This
keeps the input of each decoder block (for every calibration batch) from the last pass; the next
pass replaces the unchanged blocks by a no-op and feeds the kept input to the first changed one.
The result is bit for bit the full forward's: the changed block sees the very tensor it would have
computed, and the model's own loop still runs (embeddings, masks, rotary tables, final norm, head).

What "changed" means is the caller's: it passes one hashable state per block (the bits loaded in
each linear), and the cache compares it with the states of the last pass. A pass with no state
(`None`) runs in full and forgets what was kept, since the weights may have changed in any way.

The kept inputs cost tokens x hidden size x dtype bytes per block. When all blocks would exceed
`max_bytes`, only every k-th block's input is kept and a pass starts at the last kept block at or
before the first change.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Hashable, Iterator, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)

BlockStates = Sequence[Hashable]


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a decoder block is called with (first positional or `hidden_states`)."""
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


class BlockPrefixCache:
    """Inputs of the decoder blocks from the last forward pass, per calibration batch."""

    def __init__(self, blocks: nn.ModuleList, n_batches: int, bytes_per_block: int, max_bytes: int) -> None:
        self.blocks = blocks
        n, room = len(blocks), max_bytes // max(bytes_per_block, 1)  # room: block inputs that fit
        # block 0's input is the embedding output, never kept; the rest every `stride` blocks
        self.kept = list(range(stride := -(-(n - 1) // room), n, stride)) if room >= 1 and n > 1 else []
        self._inputs: list[dict[int, torch.Tensor]] = [{} for _ in range(n_batches)]
        self._states: tuple | None = None  # block states of the pass the kept inputs come from
        self._pending: tuple | None = None
        self._returns_tuple: bool | None = None
        self.blocks_skipped = 0
        self.blocks_run = 0

    @property
    def enabled(self) -> bool:
        return bool(self.kept)

    def start_block(self, states: BlockStates | None) -> int:
        """The block a pass with these states may start at: the last kept one before the first change."""
        if states is None or self._states is None or not self.kept:
            return 0
        states = tuple(states)
        first = next((i for i, (a, b) in enumerate(zip(states, self._states)) if a != b), len(states))
        return max((k for k in self.kept if k <= first), default=0)

    def begin(self, states: BlockStates | None) -> int:
        """Start a pass (all batches); returns its first block. Until `commit`, nothing is trusted."""
        start = self.start_block(states)
        self._pending = None if states is None else tuple(states)
        self._states = None  # a pass that stops half-way leaves a mix of old and new inputs
        self.blocks_skipped += start
        self.blocks_run += len(self.blocks) - start
        return start

    def commit(self) -> None:
        """The pass finished for every batch: its inputs are the kept ones now."""
        self._states = self._pending

    @contextlib.contextmanager
    def forward_from(self, batch: int, start: int) -> Iterator[None]:
        """Within this context a forward of `batch` skips the blocks before `start` and keeps the
        inputs of the later kept blocks."""
        kept = self._inputs[batch]
        handles = []

        def keep(index: int) -> Callable:
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                kept[index] = _hidden_of(args, kwargs).detach().clone()

            return hook

        def feed(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            return _with_hidden(args, kwargs, kept[start])

        saved_forwards: list[tuple[nn.Module, Any]] = []
        try:
            for i in self.kept:
                if i > start:
                    handles.append(self.blocks[i].register_forward_pre_hook(keep(i), with_kwargs=True))
            if start > 0:
                handles.append(self.blocks[start].register_forward_pre_hook(feed, with_kwargs=True))
                for block in self.blocks[:start]:
                    saved_forwards.append((block, block.__dict__.get("forward")))
                    block.forward = self._skip
            elif self._returns_tuple is None:
                handles.append(self.blocks[0].register_forward_hook(self._note_return_type))
            yield
        finally:
            for h in handles:
                h.remove()
            for block, previous in saved_forwards:
                if previous is None:
                    del block.forward
                else:
                    block.forward = previous

    def _note_return_type(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._returns_tuple = isinstance(output, tuple)

    def _skip(self, *args: Any, **kwargs: Any) -> Any:
        """A skipped block: returns its input unchanged, shaped as the block's own output."""
        hidden = _hidden_of(args, kwargs)
        return (hidden,) if self._returns_tuple else hidden


def verify_prefix_reuse(cache: BlockPrefixCache, run_batch: Callable[[], torch.Tensor]) -> bool:
    """Whether starting at a middle block gives the full forward's output on this model.

    `run_batch` runs batch 0 and returns its output. A layout whose blocks pass more than the hidden
    states along (so skipping them is not a no-op) fails here, and the cache is turned off."""
    if not cache.enabled:
        return False
    with cache.forward_from(0, 0):
        full = run_batch()
    mid = cache.kept[len(cache.kept) // 2]
    with cache.forward_from(0, mid):
        resumed = run_batch()
    ok = full.shape == resumed.shape and torch.equal(full, resumed)
    if not ok:
        err = float((full.float() - resumed.float()).abs().max()) if full.shape == resumed.shape else float("nan")
        log.warning("prefix reuse: starting at block %d does not reproduce the full forward (max diff %.3g); every pass runs in full", mid, err)
        cache.kept = []
    cache._states = None
    return ok
