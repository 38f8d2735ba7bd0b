"""Held-out perplexity of bit configurations on every held-out text, for the benchmark scripts that
compare methods by what their picks give on text the search never saw."""

from __future__ import annotations

from amq.config.compose import Workbench
from amq.evaluation.perplexity import PerplexityProtocol, perplexity, perplexity_windows


class HeldoutPerplexity:
    """Held-out perplexity of a bit configuration on every held-out text (the calibration text's
    held-out part first, then texts of other domains, e.g. the Lee corpus), with the proxy weights
    applied; cached per configuration."""

    def __init__(self, wb: Workbench, protocol: PerplexityProtocol) -> None:
        self.wb, self.protocol = wb, protocol.fit_to(wb.lm.model)
        self.windows = {name: perplexity_windows(wb.lm.tokenizer, docs, self.protocol) for name, docs in wb.splits.heldout.items()}
        self._cache: dict[tuple, dict[str, float]] = {}

    @property
    def texts(self) -> list[str]:
        """The held-out texts' names; the first is the one the `perplexity` columns report."""
        return list(self.windows)

    def __call__(self, bits: dict[str, int] | None) -> dict[str, float]:
        """Perplexity per held-out text of `bits` (None: the unquantized model)."""
        key = tuple(sorted(bits.items())) if bits is not None else ()
        if key not in self._cache:
            if bits is None:
                self.wb.bank.restore()
            else:
                self.wb.bank.apply(bits)
            self._cache[key] = {name: perplexity(self.wb.lm.model, w, name)["perplexity"] for name, w in self.windows.items()}
        return self._cache[key]

    def describe(self) -> dict:
        return {
            "texts": {name: f"held-out {name} of {self.wb.splits.description}" for name in self.windows},
            "tokens": {name: int(w.numel()) for name, w in self.windows.items()},
            **self.protocol.describe(),
        }
