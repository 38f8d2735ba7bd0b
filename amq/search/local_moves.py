"""Local moves around a target's incumbent: the candidates of the target-focused slots (`search.target_slots`).

NSGA-II spreads its batch along the whole bits axis, so the best configuration at a bits target a
user asked for rarely improves once the initial design's knapsack allocations are in
(docs/benchmarks.md). A local move starts from that incumbent (the best measured configuration at
or under the target) and either trades width between two linears at nearly equal average bits
(one gene one step up, another one step down) or spends the slack left under the target (genes
raised one step while the average stays under it). Many such neighbours are drawn; the predictor
picks among them (amq.search.loop). Every neighbour stays at or under its target, so any
improvement it brings is an improvement at that target.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from amq.errors import InvalidArgument, require_at_least
from amq.search.space import SearchSpace

BITS_EPS = 1e-9  # the tolerance of best_under_target: a neighbour at target + BITS_EPS still counts as under it


def step_costs(space: SearchSpace, genes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(up, down): what one step up on each gene adds to the average bits, and what one step down
    saves; inf where the gene is already at its highest (up) or lowest (down) choice."""
    idx = np.arange(space.n_genes)
    table, top = space.choice_bits, space.sizes - 1
    cur = table[idx, genes]
    up = np.where(genes < top, (table[idx, np.minimum(genes + 1, top)] - cur) * space.gene_share, np.inf)
    down = np.where(genes > 0, (cur - table[idx, np.maximum(genes - 1, 0)]) * space.gene_share, np.inf)
    return up, down


@dataclass(frozen=True)
class LocalMoves:
    """How the neighbours of an incumbent are drawn.

    A trade may lower the average by at most `bits_tolerance` below the lower of the incumbent's
    bits and the target, so neighbours stay close to the target instead of drifting down the front.
    """

    n_candidates: int = 384  # neighbours drawn per target (the predictor scores them all)
    max_trades: int = 3  # trades per neighbour: 0 to max_trades (0: a pure slack fill)
    fill_prob: float = 0.5  # chance that a neighbour with trades also spends the slack left under the target
    bits_tolerance: float = 0.01  # average bits a trade may give up (see above)
    tries: int = 8  # genes tried as the raised side of a trade before giving up on one

    def __post_init__(self) -> None:
        require_at_least(self, "n_candidates", 1)
        require_at_least(self, "max_trades", 0)
        require_at_least(self, "tries", 1)
        if not 0.0 <= self.fill_prob <= 1.0:
            raise InvalidArgument("fill_prob", f"{self.fill_prob}", "a probability in [0, 1]")
        if self.bits_tolerance < 0:
            raise InvalidArgument("bits_tolerance", f"{self.bits_tolerance}", "average bits >= 0")

    def neighbours(self, space: SearchSpace, incumbent: np.ndarray, target: float, rng: np.random.Generator) -> np.ndarray:
        """Distinct neighbours of `incumbent` (not itself), each at or under `target` average bits (with scale/zero)."""
        incumbent = np.asarray(incumbent, dtype=int)
        start = float(space.avg_bits(incumbent))
        floor = min(start, target) - self.bits_tolerance
        out: list[np.ndarray] = []
        for _ in range(self.n_candidates):
            genes, bits = incumbent.copy(), start
            n_trades = int(rng.integers(0, self.max_trades + 1))
            for _ in range(n_trades):
                bits = self._trade(space, genes, bits, floor, target, rng)
            if n_trades == 0 or rng.random() < self.fill_prob:
                bits = self._fill(space, genes, bits, target, rng)
            out.append(genes)
        cands = np.unique(np.stack(out), axis=0)
        keep = (space.avg_bits(cands) <= target + BITS_EPS) & (cands != incumbent[None, :]).any(axis=1)
        return cands[keep]

    def _trade(self, space: SearchSpace, genes: np.ndarray, bits: float, floor: float, ceiling: float, rng: np.random.Generator) -> float:
        """Raise one gene a step and lower another a step, the average staying in [floor, ceiling]; in place, returns the new average."""
        up, down = step_costs(space, genes)
        raisable = np.flatnonzero(np.isfinite(up))
        for i in rng.permutation(raisable)[: self.tries]:
            new = bits + up[i] - down
            ok = np.isfinite(down) & (new <= ceiling + BITS_EPS) & (new >= floor)
            ok[i] = False
            js = np.flatnonzero(ok)
            if len(js):
                j = int(rng.choice(js))
                genes[i] += 1
                genes[j] -= 1
                return float(new[j])
        return bits

    @staticmethod
    def _fill(space: SearchSpace, genes: np.ndarray, bits: float, ceiling: float, rng: np.random.Generator) -> float:
        """Raise genes one step each, in random order, wherever the step still fits under `ceiling`; in place."""
        up, _ = step_costs(space, genes)
        slack = ceiling - bits
        for i in rng.permutation(space.n_genes):
            if up[i] <= slack + BITS_EPS:
                genes[i] += 1
                slack -= up[i]
        return ceiling - slack
