"""The search space: one gene per searchable linear (or per shared-precision group).

A gene holds an index into the sorted bit choices. Linears pinned by the sensitivity stage stay at
the highest width and carry no gene. Conversions between genes, bit configurations by module name,
and the average-bits accounting all live here, vectorised over populations.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from amq.bits import BitConfig, meta_overhead
from amq.errors import ConfigError
from amq.modeling.discovery import LinearInfo


def shared_groups(linears: Sequence[LinearInfo], patterns: Sequence[Sequence[str]] | None) -> list[list[str]]:
    """Partition linears into precision groups: within a block, roles matching the same pattern list share one gene.

    `patterns` is a list of lists of role suffixes, e.g. [[q_proj, k_proj, v_proj], [gate_proj, up_proj]]
    (what serving engines fuse). Unmatched linears form singleton groups.
    """
    groups: list[list[str]] = []
    seen: dict[tuple[int, int], list[str]] = {}
    for li in linears:
        key = None
        for gi, pats in enumerate(patterns or []):
            if any(re.search(rf"(^|\.){re.escape(p)}$", li.role) for p in pats):
                key = (li.block, gi)
                break
        if key is None:
            groups.append([li.name])
        elif key in seen:
            seen[key].append(li.name)
        else:
            seen[key] = [li.name]
            groups.append(seen[key])
    return groups


@dataclass
class SearchSpace:
    """Genes over groups of linears; bit choices; pinned linears; bit accounting."""

    linears: Sequence[LinearInfo]
    bit_choices: Sequence[int]
    group_size: int
    pinned: Iterable[str] = ()
    share_patterns: Sequence[Sequence[str]] | None = None
    groups: list[list[str]] = field(init=False)

    def __post_init__(self) -> None:
        self.bit_choices = sorted(int(b) for b in self.bit_choices)
        if len(self.bit_choices) < 2 or len(set(self.bit_choices)) != len(self.bit_choices):
            raise ConfigError("search.bits", f"{list(self.bit_choices)}", "at least two distinct bit widths, e.g. [3, 4, 8]")
        all_groups = shared_groups(self.linears, self.share_patterns)
        pinned = set(self.pinned)
        # A group that serving engines fuse must be pinned whole, or it can't be served.
        self.pinned = sorted({n for g in all_groups if pinned.intersection(g) for n in g})
        self.groups = [g for g in all_groups if not pinned.intersection(g)]
        if not self.groups:
            raise ConfigError("search.pruning.threshold", "every linear was pinned, nothing is left to search", "a larger threshold")
        numel = {li.name: li.numel for li in self.linears}
        self._total = float(sum(numel.values()))
        self._gene_numel = np.array([sum(numel[n] for n in g) for g in self.groups], dtype=np.float64)
        self._pinned_numel = float(sum(numel[n] for n in self.pinned))
        self._choices = np.array(self.bit_choices, dtype=np.float64)

    # -------------------------------------------------------------- basics
    @property
    def n_genes(self) -> int:
        return len(self.groups)

    @property
    def n_choices(self) -> int:
        return len(self.bit_choices)

    @property
    def meta_bits(self) -> float:
        return meta_overhead(self.group_size)

    def fingerprint(self, model_fingerprint: str) -> str:
        """Identifies the space; a resumed run must match it exactly."""
        payload = {
            "model": model_fingerprint,
            "bits": list(self.bit_choices),
            "group_size": self.group_size,
            "groups": self.groups,
            "pinned": list(self.pinned),
        }
        return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]

    # -------------------------------------------------------------- accounting
    def avg_bits(self, genes: np.ndarray, with_meta: bool = True) -> np.ndarray:
        """Average bits of each row of `genes` (shape [n, n_genes] or [n_genes])."""
        g = np.atleast_2d(genes).astype(int)
        weighted = self._choices[g] @ self._gene_numel + self._pinned_numel * self._choices[-1]
        avg = weighted / self._total
        avg = avg + self.meta_bits if with_meta else avg
        return avg if np.ndim(genes) > 1 else avg[0]

    def bits_range(self) -> tuple[float, float]:
        """The lowest and highest reachable average bits (with scale/zero)."""
        lo = self.avg_bits(np.zeros(self.n_genes, dtype=int))
        hi = self.avg_bits(np.full(self.n_genes, self.n_choices - 1))
        return float(lo), float(hi)

    def check_targets(self, targets: Iterable[float], setting: str = "search.targets") -> list[float]:
        lo, hi = self.bits_range()
        out = []
        for t in targets:
            if not lo - 1e-9 <= float(t) <= hi + 1e-9:
                raise ConfigError(setting, f"target {t} bits is outside the reachable range", f"{lo:.3f} to {hi:.3f} bits (with scale/zero)")
            out.append(float(t))
        return out

    # -------------------------------------------------------------- conversion
    def uniform(self, choice_index: int) -> np.ndarray:
        return np.full(self.n_genes, choice_index, dtype=int)

    def random(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(0, self.n_choices, size=(n, self.n_genes))

    def to_bits(self, genes: np.ndarray) -> dict[str, int]:
        """Bits per module name (pinned linears at the highest width)."""
        bits = {n: self.bit_choices[-1] for n in self.pinned}
        for g, idx in zip(self.groups, np.asarray(genes, dtype=int)):
            for n in g:
                bits[n] = self.bit_choices[idx]
        return bits

    def to_config(self, genes: np.ndarray) -> BitConfig:
        return BitConfig(bits=self.to_bits(genes), group_size=self.group_size)

    def from_bits(self, bits: Mapping[str, int]) -> np.ndarray:
        """Genes of a bit assignment by module name (each group reads its first member)."""
        try:
            return np.array([self.bit_choices.index(int(bits[g[0]])) for g in self.groups], dtype=int)
        except (KeyError, ValueError) as exc:
            raise ValueError(f"bit assignment does not fit this search space: {exc}") from None

    @staticmethod
    def key(genes: np.ndarray) -> str:
        """A hashable identity of a gene vector (for de-duplication)."""
        return "".join(chr(48 + int(x)) for x in np.asarray(genes).ravel())
