"""Stage: the iterative search-and-update loop (AMQ).

Iteration 0 is the initial design (uniform configurations plus random ones), evaluated for real.
Each later iteration fits the predictor on the archive, runs NSGA-II on the predictor, picks a
batch of unseen candidates spread along the bits axis, evaluates them for real and archives them.

Every iteration's randomness comes from (seed, iteration) and its predictor sees only records
from earlier iterations, so an interrupted iteration re-runs to the same batch; configurations
already in the archive are never evaluated again. A failed evaluation (non-finite metric) stays
in the archive with its reason, out of the predictor's training data, and the search goes on.

Each proposed configuration is archived with the prediction that proposed it, so every iteration
scores the predictor on its own batch and, pooled, on every batch so far (the within-bits tau of
one batch rests on a handful of pairs); both read the archive alone, so a resumed run logs the same.

With a deadline (`deadline`, a `clock()` value), the loop stops at an iteration boundary when the next
iteration, projected to last as long as the previous one, would end past it: the archive then
holds whole iterations only, so the front is valid and a continued run (with a later deadline)
picks up at the next iteration and reaches the same archive as an uninterrupted one. Iteration 0
always runs, so there is a front to return.

With `target_slots` > 0, that share of every later batch goes to local moves around each target's
incumbent (amq.search.local_moves), the predictor's best per target taken in turn; NSGA-II's
selection fills the rest. They come first in the batch, and the iteration's row counts them
(`search/target_slots`) and how many became a target's incumbent (`search/target_slot_incumbents`).
Their randomness comes from (seed, iteration) too, so a resumed run proposes the same batches.
With `resolve_moves`, each target's first slot goes to the best-scored allocation re-solved on the
predictor's single-linear changes (amq.search.resolved_moves).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Protocol

import numpy as np

from amq.errors import InvalidArgument, require_at_least
from amq.predictors.accuracy import heldout_scores, pooled_scores
from amq.predictors.base import Predictor, UncertainPredictor
from amq.search.archive import Archive
from amq.search.evaluator import Evaluate
from amq.search.local_moves import LocalMoves
from amq.search.nsga import NSGA2Settings, PredictedQualityProblem, run_nsga2
from amq.search.pareto import best_under_target, nondominated, normalized_hypervolume
from amq.search.resolved_moves import resolved_moves
from amq.search.selection import round_robin, select_batch
from amq.search.space import SearchSpace

log = logging.getLogger(__name__)


class IterationObserver(Protocol):
    def __call__(self, row: dict, archive: Archive) -> None: ...


@dataclass
class SearchSettings:
    """How much work the loop does (the `budget` config group fills these)."""

    n_initial_random: int
    iterations: int
    batch_size: int
    nsga: NSGA2Settings = field(default_factory=NSGA2Settings)
    bits_window: tuple[float, float] | None = None
    kappa: float = 0.0  # > 0: NSGA-II minimises mean - kappa * std where the predictor gives a std
    target_slots: float = 0.0  # share of each batch given to local moves around the targets' incumbents (0: NSGA-II only)
    moves: LocalMoves = field(default_factory=LocalMoves)
    resolve_moves: bool = False  # each target's first slot: the knapsack re-solved on the predictor's single-gene changes (amq.search.resolved_moves)

    def __post_init__(self) -> None:
        require_at_least(self, "iterations", 0)
        require_at_least(self, "n_initial_random", 0)
        require_at_least(self, "batch_size", 1)
        if not 0.0 <= self.target_slots <= 1.0:
            raise InvalidArgument("target_slots", f"{self.target_slots}", "a fraction of the batch from 0 to 1 (0: off)")
        if self.resolve_moves and self.target_slots <= 0:
            raise InvalidArgument("resolve_moves", "true with target_slots=0 (re-solved moves fill target slots)", "target_slots > 0, or resolve_moves=false")
        if self.bits_window is not None and not (len(self.bits_window) == 2 and self.bits_window[0] < self.bits_window[1]):
            raise InvalidArgument("bits_window", f"{list(self.bits_window)}", "[low, high] average bits with low < high, or null")
        if self.iterations == 0 and self.n_initial_random == 0:
            raise InvalidArgument("", "no iterations and no initial random configurations: nothing to search", "iterations >= 1 or n_initial_random >= 1")

    @property
    def n_target_slots(self) -> int:
        """Slots of a batch for the targets: the share rounded half up, at least one when the share is > 0."""
        if self.target_slots <= 0:
            return 0
        return max(1, min(self.batch_size, math.floor(self.target_slots * self.batch_size + 0.5)))


def search_bits_range(space: SearchSpace, settings: SearchSettings) -> tuple[float, float]:
    """Where the search concentrates: the bits window when set, else the whole reachable range."""
    lo, hi = space.bits_range()
    if settings.bits_window:
        wlo, whi = settings.bits_window
        return max(lo, wlo), min(hi, whi)
    return lo, hi


def duration_text(seconds: float) -> str:
    """A short duration for log lines: 45s, 1m40s, 2h05m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class IterativeSearch:
    def __init__(
        self,
        space: SearchSpace,
        evaluate: Evaluate,
        make_predictor: Callable[[int], Predictor],
        settings: SearchSettings,
        archive: Archive,
        metric_name: str,
        targets: list[float],
        seed: int,
        observers: list[IterationObserver] | None = None,
        seeder: Callable[[dict[int, float]], np.ndarray] | None = None,
        evaluation_guard: Callable[[], ContextManager] = contextlib.nullcontext,
        deadline: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.space, self.evaluate, self.make_predictor = space, evaluate, make_predictor
        self.settings, self.archive, self.metric_name = settings, archive, metric_name
        self.targets, self.seed = targets, seed
        self.observers = observers or []
        self.seeder = seeder
        self.evaluation_guard = evaluation_guard  # wraps each evaluation + archive line (graceful stop)
        self.metric_scale: float | None = None
        self.deadline, self.clock = deadline, clock  # `deadline` is a `clock()` value; None: no time limit
        self.stopped: dict | None = None  # after run(): why and where it stopped early (None: ran to its end)

    @property
    def bits_range(self) -> tuple[float, float]:
        return search_bits_range(self.space, self.settings)

    # -------------------------------------------------------------- pieces
    def _rng(self, iteration: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, iteration])

    def _uniform_design(self) -> np.ndarray:
        return np.stack([self.space.uniform(b) for b in self.space.bit_choices])

    def initial_design(self) -> np.ndarray:
        """Uniform configurations, then warm-start seeds (given the uniform metrics), then random ones.

        Seeds take random slots, so the initial design's size stays `n_initial_random` + uniforms.
        """
        uniform = self._uniform_design()
        seeds = np.zeros((0, self.space.n_genes), dtype=int)
        if self.seeder is not None:
            metric_of = {self.space.key(r.genes): r.metric for r in self.archive.records}
            measured = {b: metric_of.get(self.space.key(g)) for b, g in zip(self.space.bit_choices, uniform)}
            seeds = self.seeder({b: m for b, m in measured.items() if m is not None and np.isfinite(m)})
        n_random = max(self.settings.n_initial_random - len(seeds), 0)
        rand = self.space.random(self._rng(0), n_random, self.settings.bits_window and self.bits_range)
        return np.vstack([uniform, seeds, rand])

    def _evaluate_batch(self, batch: np.ndarray, iteration: int, predicted: np.ndarray | None = None) -> tuple[int, float]:
        """Evaluate and archive the unseen configurations of `batch` (with `predicted`: each one's prediction)."""
        done, secs = 0, 0.0
        t_last = time.perf_counter()
        for i, genes in enumerate(batch):
            if genes in self.archive:
                continue
            with self.evaluation_guard():
                result = self.evaluate(genes)
                self.archive.add(genes, result, iteration, self.metric_name, None if predicted is None else float(predicted[i]))
            if not result.ok:
                log.warning("iteration %d: evaluation failed (%s); recorded, the search goes on", iteration, result.failure)
            done, secs = done + 1, secs + result.seconds
            if time.perf_counter() - t_last > 15:
                log.info("iteration %d: evaluated %d/%d", iteration, done, len(batch))
                t_last = time.perf_counter()
        return done, secs

    def _acquisition(self, predictor: Predictor) -> Callable[[np.ndarray], np.ndarray]:
        """What NSGA-II minimises: the predicted metric, or an optimistic bound when uncertainty is on."""
        if self.settings.kappa > 0 and isinstance(predictor, UncertainPredictor):
            kappa = self.settings.kappa

            def lower_bound(genes: np.ndarray) -> np.ndarray:
                mean, std = predictor.predict_dist(self.space.features(genes))
                return mean - kappa * std

            return lower_bound
        return lambda genes: predictor.predict(self.space.features(genes))

    def propose(self, iteration: int) -> tuple[np.ndarray, Predictor, dict]:
        """Fit the predictor on records of earlier iterations, run NSGA-II, select a batch."""
        X_all, y, bits = self.archive.arrays(before_iteration=iteration)
        seen = {self.space.key(g) for g in X_all}  # failed ones too: never proposed again
        finite = np.isfinite(y)
        X, y, bits = X_all[finite], y[finite], bits[finite]
        t0 = time.perf_counter()
        predictor = self.make_predictor(self.seed * 100_003 + iteration).fit(self.space.features(X), y)
        fit_s = time.perf_counter() - t0
        problem = PredictedQualityProblem(self.space, self._acquisition(predictor), self.settings.bits_window)
        front = X[nondominated(np.column_stack([y, bits]))]
        t1 = time.perf_counter()
        popX, popF = run_nsga2(problem, self.settings.nsga, front, seed=self.seed * 100_003 + iteration, window=self.settings.bits_window and self.bits_range)
        nsga_s = time.perf_counter() - t1
        info = {"predictor/fit_seconds": fit_s, "search/nsga_seconds": nsga_s, "predictor/n_train": int(len(y))}
        if not self.settings.n_target_slots:
            batch = select_batch(popX, popF[:, 0], popF[:, 1], seen, self.space.key, self.settings.batch_size, self.bits_range, self.targets)
            return batch, predictor, info
        targeted = self.target_moves(iteration, predictor, X, y, bits, seen)
        seen |= {self.space.key(g) for g in targeted}
        n_rest = self.settings.batch_size - len(targeted)
        rest = select_batch(popX, popF[:, 0], popF[:, 1], seen, self.space.key, n_rest, self.bits_range, self.targets) if n_rest else targeted[:0]
        info["search/target_slots"] = len(targeted)
        return np.vstack([targeted, rest]), predictor, info

    def target_moves(self, iteration: int, predictor: Predictor, X: np.ndarray, y: np.ndarray, bits: np.ndarray, seen: set[str]) -> np.ndarray:
        """The batch's target-focused share: local moves around each target's incumbent (the best measured
        configuration at or under it, among `X`), unseen, ranked by the acquisition, taken in turn per target."""
        rng = self._rng(iteration)
        score = self._acquisition(predictor)
        ranked, notes, resolved = [], [], set()
        for t in self.targets:
            idx = best_under_target(y, bits, t)
            if idx is None:
                continue
            cands = self.settings.moves.neighbours(self.space, X[idx], t, rng)
            extra: set[str] = set()
            if self.settings.resolve_moves:
                solved = resolved_moves(self.space, X[idx], t, lambda g: predictor.predict(self.space.features(g)))
                extra = {self.space.key(g) for g in solved}
                cands = np.unique(np.vstack([cands, solved]), axis=0)
            keys = [self.space.key(g) for g in cands]
            new = [k not in seen for k in keys]
            cands, keys = cands[new], [k for k, n in zip(keys, new) if n]
            if not len(cands):
                continue
            s = score(cands)
            order = np.argsort(s, kind="stable")
            lead = [i for i in order if keys[i] in extra][:1]  # the best-scored re-solved move leads the target's list
            resolved.update(keys[i] for i in lead)
            ranked.append(cands[lead + [i for i in order if i not in lead]])
            notes.append(f"{t:g}b {y[idx]:.4g} -> {s[order[0]]:.4g} ({len(cands)} moves)")
        picks = round_robin(ranked, self.settings.n_target_slots, self.space.key, seen).reshape(-1, self.space.n_genes)
        n_resolved = sum(self.space.key(g) in resolved for g in picks)
        log.info(
            "iteration %d: %d slots to the targets' incumbents%s (best acquisition: %s)",
            iteration,
            len(picks),
            f", {n_resolved} of them re-solved" if self.settings.resolve_moves else "",
            "; ".join(notes) or "no incumbent",
        )
        return picks

    def _predicted_records(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(predicted, actual, avg_bits, iteration) of the successful records that carry a proposal-time prediction."""
        recs = [r for r in self.archive.records if r.predicted is not None and r.failure is None]
        return (
            np.array([r.predicted for r in recs], dtype=float),
            np.array([r.metric for r in recs], dtype=float),
            np.array([r.avg_bits for r in recs], dtype=float),
            np.array([r.iteration for r in recs], dtype=int),
        )

    def heldout_accuracy(self, iteration: int) -> dict:
        """Score the predictor on this iteration's true evaluations (none of which it was fitted on),
        and on every iteration's so far, pooled."""
        predicted, actual, bits, iterations = self._predicted_records()
        this = iterations == iteration
        return {
            **heldout_scores(predicted[this], actual[this], bits[this], self.targets),
            **pooled_scores(predicted, actual, bits, iterations, self.targets),
        }

    def _incumbents(self) -> dict[float, int]:
        """{target: index into archive.records of the best measured configuration at or under it}."""
        _, y, bits = self.archive.arrays()
        y = np.where(np.isfinite(y), y, np.inf)
        found = {t: best_under_target(y, bits, t) for t in self.targets}
        return {t: i for t, i in found.items() if i is not None}

    def incumbents_among(self, genes: np.ndarray) -> int:
        """How many targets' incumbents are among `genes` (this iteration's target slots)."""
        keys = {self.space.key(g) for g in genes}
        return sum(self.space.key(self.archive.records[i].genes) in keys for i in self._incumbents().values())

    def iteration_row(self, iteration: int, timings: dict, n_new: int, eval_s: float) -> dict:
        _, y, bits = self.archive.arrays()
        finite = np.isfinite(y)
        row = {
            "iteration": iteration,
            "n_evaluated": len(self.archive),
            "n_new": n_new,
            "n_reused": sum(r.reused for r in self.archive.records if r.iteration == iteration),
            "n_failed": sum(r.failure is not None for r in self.archive.records if r.iteration == iteration),
            "hypervolume": normalized_hypervolume(y[finite], bits[finite], self.metric_scale or 1.0, self.bits_range),
            "search/eval_seconds": eval_s,
            **timings,
        }
        for t in self.targets:
            idx = best_under_target(np.where(finite, y, np.inf), bits, t)
            row[f"best/{self.metric_name}@{t:g}"] = None if idx is None else float(y[idx])
        return row

    # -------------------------------------------------------------- driver
    def run(self, start_iteration: int = 0) -> list[dict]:
        """Run iterations from `start_iteration` (0 = initial design) to the budget's last one, or
        until the next would end past the deadline (then `self.stopped` says after which)."""
        rows: list[dict] = []
        seconds: dict[int, float] = {}  # iteration -> how long it took in this process
        last = self.settings.iterations
        self.stopped = None
        slot_keys: set[str] = set()  # target-slot configurations proposed in this process
        for it in range(start_iteration, last + 1):
            if it > 0 and self._out_of_time(seconds):
                self.stopped = {"reason": "max_minutes", "after_iteration": it - 1, "of": last}
                break
            t0 = self.clock()
            predictor, pre_new, pre_s = None, 0, 0.0
            if it == 0:
                pre_new, pre_s = self._evaluate_batch(self._uniform_design(), it)  # the seeder reads their metrics
                batch, timings = self.initial_design(), {}
            else:
                batch, predictor, timings = self.propose(it)
            predicted = None if predictor is None else predictor.predict(self.space.features(batch))
            n_new, eval_s = self._evaluate_batch(batch, it, predicted)
            n_new, eval_s = n_new + pre_new, eval_s + pre_s
            if predictor is not None:
                timings.update(self.heldout_accuracy(it))
            if self.metric_scale is None:
                self.metric_scale = self._lowest_uniform_metric()
            targeted = batch[: timings.get("search/target_slots", 0)]
            slot_keys |= {self.space.key(g) for g in targeted}
            row = self.iteration_row(it, timings, n_new, eval_s)
            if "search/target_slots" in row:
                row["search/target_slot_incumbents"] = self.incumbents_among(targeted)
            row["search/iteration_seconds"] = seconds[it] = self.clock() - t0
            rows.append(row)
            best = ", ".join(f"{k.split('@')[1]}b: {v:.4g}" for k, v in row.items() if k.startswith("best/") and v is not None)
            best += self._accuracy_text(row)
            extra = "".join(f", {row[k]} {word}" for k, word in (("n_reused", "reused from the cache"), ("n_failed", "failed")) if row[k])
            log.info(
                "iteration %d/%d: %d new%s, %d in archive, hypervolume %.4f, best %s [%.1fs%s]",
                it,
                last,
                n_new,
                extra,
                row["n_evaluated"],
                row["hypervolume"],
                best or "-",
                seconds[it],
                self._time_left(seconds, last - it),
            )
            for obs in self.observers:
                obs(row, self.archive)
        if self.settings.n_target_slots and rows:
            self._log_incumbent_sources(slot_keys, start_iteration)
        return rows

    def _log_incumbent_sources(self, slot_keys: set[str], start_iteration: int) -> None:
        """One line: where each target's incumbent came from (target slot, NSGA-II, initial design)."""
        parts = []
        for t, i in self._incumbents().items():
            rec = self.archive.records[i]
            if self.space.key(rec.genes) in slot_keys:
                source = "a target slot"
            elif rec.iteration == 0:
                source = "the initial design"
            elif rec.iteration >= start_iteration:
                source = "NSGA-II"
            else:
                source = "before this process"
            parts.append(f"{t:g}b: iteration {rec.iteration}, {source}")
        log.info("targets' incumbents: %s", "; ".join(parts) or "none")

    @staticmethod
    def _accuracy_text(row: dict) -> str:
        """'; predictor tau within bits bins 0.50 (2 pairs), pooled 0.81 (64 pairs)' ('' before any predictor)."""
        parts = []
        for key, label in (("", ""), ("_pooled", "pooled ")):
            tau = row.get(f"predictor/kendall_tau_within_bits{key}")
            if tau is not None:
                parts.append(f"{label}{tau:.2f} ({row[f'predictor/pairs_within_bits{key}']} pairs)")
        return f"; predictor tau within bits bins {', '.join(parts)}" if parts else ""

    def _out_of_time(self, seconds: dict[int, float]) -> bool:
        """Whether the next iteration, lasting as long as the last one (0 s before any), would end past the deadline."""
        if self.deadline is None:
            return False
        projected = seconds[max(seconds)] if seconds else 0.0
        return self.clock() + projected > self.deadline

    def _time_left(self, seconds: dict[int, float], iterations_left: int) -> str:
        """', ~1m40s left': mean iteration time x iterations left, capped by the deadline ('' at the end).

        The mean leaves out iteration 0 once a later one has run: the initial design is larger
        than a batch and has no predictor to fit, so it would skew the estimate.
        """
        if iterations_left <= 0:
            return ""
        later = [s for it, s in seconds.items() if it > 0] or list(seconds.values())
        estimate = float(np.mean(later)) * iterations_left
        to_deadline = math.inf if self.deadline is None else max(self.deadline - self.clock(), 0.0)
        if to_deadline < estimate:
            return f", ~{duration_text(to_deadline)} left to the time limit"
        return f", ~{duration_text(estimate)} left"

    def _lowest_uniform_metric(self) -> float:
        low = self.space.uniform(self.space.bit_choices[0])
        for r in self.archive.records:
            if np.array_equal(r.genes, low) and np.isfinite(r.metric):
                return r.metric
        return 1.0
