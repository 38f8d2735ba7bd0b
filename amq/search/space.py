"""The search space: one gene per searchable linear (or per shared-precision group).

In mixture-of-experts layers, one projection of all of a layer's experts shares a gene by default
(`expert_genes="projection"`): the gene count and the sensitivity probes stay those of a dense
model (a layer of 64 experts would otherwise add 128 genes, and 128 probes). `expert_genes="expert"`
gives each expert's linears their own genes.

A gene holds an index into the sorted bit choices. Linears pinned by the sensitivity stage stay at
the highest width and carry no gene. Conversions between genes, bit configurations by module name,
and the average-bits accounting all live here, vectorised over populations.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from amq.bits import BitConfig, meta_overhead
from amq.errors import InvalidArgument
from amq.modeling.discovery import LinearInfo

log = logging.getLogger(__name__)


def _matches(pattern: str, role: str) -> bool:
    return re.search(rf"(^|\.){re.escape(pattern)}$", role) is not None


def check_share_patterns(linears: Sequence[LinearInfo], patterns: Sequence[Sequence[str]] | None) -> None:
    """Refuse a share-group pattern that matches no linear while others of its group do (a typo, or
    a role this model lacks: the group would silently lose that member).

    A group none of whose patterns match is legitimate and only logged: this layout has no such
    linears to share, e.g. [gate_proj, up_proj] on an MLP of fc1/fc2 (OPT), or on a model that
    already fuses them into one gate_up_proj (Phi-3), where nothing is left to keep together.
    """
    roles = list(dict.fromkeys(li.role.rsplit(".", 1)[-1] for li in linears))
    for pats in patterns or []:
        if isinstance(pats, str):
            raise InvalidArgument(
                "share_groups", f"{pats} is a single role, not a group", "a list of groups, e.g. [[q_proj, k_proj, v_proj], [gate_proj, up_proj]]"
            )
        found = [any(_matches(p, li.role) for li in linears) for p in pats]
        if not any(found):
            log.info("share group %s matches no linear of this model: nothing to share", list(pats))
            continue
        for p, ok in zip(pats, found):
            if not ok:
                raise InvalidArgument("share_groups", f"{p} matches no linear of the model", ", ".join(roles))


EXPERT_GENES = ("projection", "expert")


def shared_groups(linears: Sequence[LinearInfo], patterns: Sequence[Sequence[str]] | None, expert_genes: str = "projection") -> list[list[str]]:
    """Partition linears into precision groups: within a block, roles matching the same pattern list share one gene.

    `patterns` is a list of lists of role suffixes, e.g. [[q_proj, k_proj, v_proj], [gate_proj, up_proj]]
    (what serving engines fuse). Other expert linears share by projection (`expert_genes`); the
    remaining linears form singleton groups.
    """
    if expert_genes not in EXPERT_GENES:
        raise InvalidArgument("expert_genes", repr(expert_genes), " or ".join(EXPERT_GENES))
    groups: list[list[str]] = []
    seen: dict[tuple[int, int | str], list[str]] = {}
    for li in linears:
        key: tuple[int, int | str] | None = None
        for gi, pats in enumerate(patterns or []):
            if any(_matches(p, li.role) for p in pats):
                key = (li.block, gi)
                break
        if key is None and li.expert is not None and expert_genes == "projection":
            key = (li.block, li.projection)
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
    """Genes over groups of linears; per-gene bit choices; pinned linears; bit accounting.

    Pruned linears keep only the `keep_top` highest widths: with keep_top=1 (the AMQ reference)
    they are pinned at the highest width and carry no gene; with keep_top=2 their gene chooses
    among the two highest widths (useful when the highest width is far above the others, e.g.
    {3, 4, 8}, where pinning at 8 bits costs more than it saves).
    """

    linears: Sequence[LinearInfo]
    bit_choices: Sequence[int]
    group_size: int
    pruned: Iterable[str] = ()
    share_patterns: Sequence[Sequence[str]] | None = None
    keep_top: int = 1
    expert_genes: str = "projection"
    groups: list[list[str]] = field(init=False)
    pinned: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.bit_choices = sorted(int(b) for b in self.bit_choices)
        if len(self.bit_choices) < 2 or len(set(self.bit_choices)) != len(self.bit_choices):
            raise InvalidArgument("bit_choices", f"{list(self.bit_choices)}", "at least two distinct bit widths, e.g. [3, 4, 8]")
        if not 1 <= self.keep_top <= len(self.bit_choices):
            raise InvalidArgument("keep_top", f"{self.keep_top}", f"1 to {len(self.bit_choices)}")
        check_share_patterns(self.linears, self.share_patterns)
        all_groups = shared_groups(self.linears, self.share_patterns, self.expert_genes)
        pruned = set(self.pruned)
        # A group that serving engines fuse is pruned whole, or it can't be served.
        pruned_groups = [g for g in all_groups if pruned.intersection(g)]
        self.pruned = sorted(n for g in pruned_groups for n in g)
        self.pinned = self.pruned if self.keep_top == 1 else []
        self.groups = [g for g in all_groups if self.keep_top > 1 or not pruned.intersection(g)]
        if not self.groups:
            raise InvalidArgument("pruned", "every linear was pinned, nothing is left to search", "a larger threshold")
        n_c = len(self.bit_choices)
        allowed = [self.bit_choices[-self.keep_top :] if set(g) <= set(self.pruned) else list(self.bit_choices) for g in self.groups]
        self._sizes = np.array([len(a) for a in allowed], dtype=int)
        self._table = np.array([a + [a[-1]] * (n_c - len(a)) for a in allowed], dtype=np.float64)
        numel = {li.name: li.numel for li in self.linears}
        self._total = float(sum(numel.values()))
        self._gene_numel = np.array([sum(numel[n] for n in g) for g in self.groups], dtype=np.float64)
        self._pinned_numel = float(sum(numel[n] for n in self.pinned))

    # -------------------------------------------------------------- basics
    @property
    def n_genes(self) -> int:
        return len(self.groups)

    @property
    def sizes(self) -> np.ndarray:
        """Number of choices of each gene (the upper bound of gene i is sizes[i] - 1)."""
        return self._sizes

    @property
    def choice_bits(self) -> np.ndarray:
        """[n_genes, n_widths] bit width of each gene's choice j (rows padded past `sizes`)."""
        return self._table

    @property
    def gene_numel(self) -> np.ndarray:
        """Weights controlled by each gene."""
        return self._gene_numel

    @property
    def gene_share(self) -> np.ndarray:
        """Each gene's share of all counted weights: one more bit on gene i adds gene_share[i] to the average."""
        return self._gene_numel / self._total

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
            "pruned": list(self.pruned),
            "keep_top": self.keep_top,
        }
        return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]

    # -------------------------------------------------------------- accounting
    def gene_bits(self, genes: np.ndarray) -> np.ndarray:
        """Bit width of every gene, rows like `genes`."""
        g = np.atleast_2d(genes).astype(int)
        return self._table[np.arange(self.n_genes)[None, :], g]

    def features(self, genes: np.ndarray) -> np.ndarray:
        """Predictor inputs: each gene's bit width scaled to [0, 1] over the bit choices."""
        lo, hi = self.bit_choices[0], self.bit_choices[-1]
        return (self.gene_bits(genes) - lo) / (hi - lo)

    def avg_bits(self, genes: np.ndarray, with_meta: bool = True) -> np.ndarray:
        """Average bits of each row of `genes` (shape [n, n_genes] or [n_genes])."""
        weighted = self.gene_bits(genes) @ self._gene_numel + self._pinned_numel * self.bit_choices[-1]
        avg = weighted / self._total
        avg = avg + self.meta_bits if with_meta else avg
        return avg if np.ndim(genes) > 1 else avg[0]

    def bits_range(self) -> tuple[float, float]:
        """The lowest and highest reachable average bits (with scale/zero)."""
        return float(self.avg_bits(np.zeros(self.n_genes, dtype=int))), float(self.avg_bits(self._sizes - 1))

    def check_targets(self, targets: Iterable[float], argument: str = "targets") -> list[float]:
        lo, hi = self.bits_range()
        out = []
        for t in targets:
            if not lo - 1e-9 <= float(t) <= hi + 1e-9:
                raise InvalidArgument(argument, f"target {t} bits is outside the reachable range", f"{lo:.3f} to {hi:.3f} bits (with scale/zero)")
            out.append(float(t))
        return out

    # -------------------------------------------------------------- conversion
    def uniform(self, bits: int) -> np.ndarray:
        """Every gene at `bits`, or at its lowest allowed width above it where `bits` is pruned."""
        return np.array([int(np.argmax(row[:k] >= bits)) if row[k - 1] >= bits else k - 1 for row, k in zip(self._table, self._sizes)])

    def random(self, rng: np.random.Generator, n: int, window: tuple[float, float] | None = None) -> np.ndarray:
        """`n` random gene vectors.

        Without a window: every gene uniform over its choices (the reference; averages cluster
        around the middle of the range). With a window: each configuration first draws its own
        mix of choices (Dirichlet), so averages spread over the whole range, and only those inside
        the window (average bits with scale/zero) are kept.
        """
        if window is None or n == 0:
            return rng.integers(0, self._sizes[None, :], size=(n, self.n_genes))
        lo, hi = window
        out: list[np.ndarray] = []
        for _ in range(200):
            mix = rng.dirichlet(np.ones(len(self.bit_choices)), size=4 * n)
            u = rng.random((4 * n, self.n_genes, 1))
            # choose choice j with probability mix[j] (renormalised over each gene's allowed choices)
            idx = np.arange(len(self.bit_choices))[None, None, :]
            w = np.where(idx < self._sizes[None, :, None], mix[:, None, :], 0.0)
            cdf = np.cumsum(w, axis=2) / w.sum(axis=2, keepdims=True)
            genes = (u > cdf).sum(axis=2).clip(max=self._sizes[None, :] - 1)
            bits = self.avg_bits(genes)
            out.extend(genes[(bits >= lo) & (bits <= hi)])
            if len(out) >= n:
                break
        if len(out) < n:
            raise ValueError(f"could not sample {n} configurations inside the bits window {window}")
        return np.stack(out[:n]).astype(int)

    def to_bits(self, genes: np.ndarray) -> dict[str, int]:
        """Bits per module name (pinned linears at the highest width)."""
        bits = {n: self.bit_choices[-1] for n in self.pinned}
        for g, b in zip(self.groups, self.gene_bits(genes)[0]):
            for n in g:
                bits[n] = int(b)
        return bits

    def to_config(self, genes: np.ndarray) -> BitConfig:
        return BitConfig(bits=self.to_bits(genes), group_size=self.group_size)

    def from_bits(self, bits: Mapping[str, int]) -> np.ndarray:
        """Genes of a bit assignment by module name (each group reads its first member)."""
        out = []
        for g, row, k in zip(self.groups, self._table, self._sizes):
            b = bits.get(g[0])
            hits = np.flatnonzero(row[:k] == b) if b is not None else []
            if len(hits) == 0:
                raise ValueError(f"bit assignment does not fit this search space at {g[0]} ({b} bits)")
            out.append(int(hits[0]))
        return np.array(out, dtype=int)

    @staticmethod
    def key(genes: np.ndarray) -> str:
        """A hashable identity of a gene vector (for de-duplication)."""
        return "".join(chr(48 + int(x)) for x in np.asarray(genes).ravel())
