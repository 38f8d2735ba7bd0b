"""Target-focused slots (`search.target_slots`): a share of each batch goes to local moves around
each target's incumbent, scored by the predictor; the rest is NSGA-II's as before.

SmolLM2-135M's real-shaped space (30 blocks of 7 linears at their real shapes, {3, 4, 8} bits
at group 64, the most sensitive linears keeping {4, 8}), an additive damage standing in for the
JSD, and a ridge regression on log(metric) with a std standing in for the GP: all in well under a
second per search.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import smollm2_linears

from amq.errors import ConfigError
from amq.search.archive import Archive, Record
from amq.search.evaluator import Evaluation, measured
from amq.search.local_moves import LocalMoves
from amq.search.loop import IterativeSearch, SearchSettings
from amq.search.nsga import NSGA2Settings
from amq.search.space import SearchSpace

TARGETS = [4.0, 4.25, 4.5]
SETTINGS = SearchSettings(n_initial_random=10, iterations=3, batch_size=8, nsga=NSGA2Settings(pop_size=16, n_gen=2), bits_window=(3.5, 5.5), kappa=1.0)
HALF = dataclasses.replace(SETTINGS, target_slots=0.5)


class Ridge:
    """A cheap uncertain predictor: ridge regression on log(metric), a std of 5% of the mean."""

    name = "ridge"

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def fit(self, X: np.ndarray, y: np.ndarray) -> "Ridge":
        A = np.c_[X, np.ones(len(X))]
        self.w = np.linalg.solve(A.T @ A + 1e-3 * np.eye(A.shape[1]), A.T @ np.log(y))
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.exp(np.c_[X, np.ones(len(X))] @ self.w)

    def predict_dist(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean = self.predict(X)
        return mean, 0.05 * mean


class Interrupted(Exception):
    """Stands in for a crash in the middle of an iteration."""


def _space() -> SearchSpace:
    lin = smollm2_linears()
    pruned = [lin[i].name for i in np.argsort(_damage(len(lin)))[-30:]]
    return SearchSpace(lin, [3, 4, 8], 64, pruned=pruned, keep_top=2)


def _damage(n: int) -> np.ndarray:
    return np.random.default_rng(0).lognormal(-7, 1.0, n)


def _search(space: SearchSpace, archive: Archive, settings: SearchSettings, crash_after: int | None = None) -> IterativeSearch:
    """The loop on an additive damage; with `crash_after`, the evaluation after that many raises."""
    damage = _damage(len(space.linears))
    calls = [0]

    def evaluate(genes: np.ndarray) -> Evaluation:
        calls[0] += 1
        if crash_after is not None and calls[0] > crash_after:
            raise Interrupted
        return measured(float((damage * 4.0 ** -space.gene_bits(genes)[0].astype(float)).sum()), 0.01, "jsd")

    return IterativeSearch(space, evaluate, Ridge, settings, archive, "jsd", TARGETS, seed=5)


def _records(archive: Archive) -> list[tuple]:
    return [(archive.space.key(r.genes), r.metric, r.iteration, r.predicted) for r in archive.records]


def _incumbent(records: list[Record], target: float) -> Record:
    under = [r for r in records if r.avg_bits <= target + 1e-9 and np.isfinite(r.metric)]
    return min(under, key=lambda r: r.metric)


# ---------------------------------------------------------------------------- the moves
@pytest.mark.parametrize("start_bits, target", [(3, 4.0), (3, 4.25), (4, 4.5), (None, 4.25)])
def test_moves_stay_at_or_under_the_target_near_it_and_are_new(start_bits, target):
    space, moves = _space(), LocalMoves()
    rng = np.random.default_rng(0)
    if start_bits is None:  # a mixed incumbent just under the target
        pool = space.random(rng, 50, (target - 0.1, target))
        incumbent = pool[np.argmax(space.avg_bits(pool))]
    else:
        incumbent = space.uniform(start_bits)
    start = float(space.avg_bits(incumbent))
    cands = moves.neighbours(space, incumbent, target, rng)
    bits = space.avg_bits(cands)

    assert len(cands) > 100
    assert (bits <= target + 1e-9).all()
    assert (bits >= min(start, target) - moves.bits_tolerance - 1e-9).all()  # trades give up little
    assert target - bits.max() < 0.01  # slack fills reach the target
    assert len({space.key(c) for c in cands}) == len(cands) and space.key(incumbent) not in {space.key(c) for c in cands}
    diff = cands - incumbent[None, :]
    assert (np.minimum(diff, 0).sum(axis=1) >= -moves.max_trades).all()  # only trades lower a gene, one step each
    if start == target:  # no slack: width moves between linears at (nearly) equal bits
        assert (bits >= target - moves.bits_tolerance).all() and (diff < 0).any(axis=1).all()


def test_the_same_rng_state_draws_the_same_moves():
    space = _space()
    a = LocalMoves().neighbours(space, space.uniform(4), 4.5, np.random.default_rng([5, 2]))
    b = LocalMoves().neighbours(space, space.uniform(4), 4.5, np.random.default_rng([5, 2]))
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------- the setting
@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_a_share_outside_0_to_1_is_refused_naming_the_setting(bad):
    with pytest.raises(ConfigError, match=r"^target_slots: .*\(valid: a fraction of the batch from 0 to 1"):
        dataclasses.replace(SETTINGS, target_slots=bad)


@pytest.mark.parametrize("share, slots", [(0.0, 0), (0.01, 1), (0.3, 2), (0.5, 4), (1.0, 8)])
def test_the_share_rounds_half_up_and_at_least_one_slot_when_on(share, slots):
    assert dataclasses.replace(SETTINGS, target_slots=share).n_target_slots == slots


def test_the_config_gives_half_the_batch_by_default_and_the_paper_presets_none(compose_cfg):
    assert compose_cfg([]).search.target_slots == 0.5
    assert compose_cfg(["search.target_slots=0"]).search.target_slots == 0.0
    assert compose_cfg(["experiment=paper_llama2_7b"]).search.target_slots == 0.0


# ---------------------------------------------------------------------------- the loop
def test_a_share_of_0_proposes_exactly_what_the_loop_proposes_without_the_setting():
    space = _space()
    absent = SearchSettings(**{f.name: getattr(SETTINGS, f.name) for f in dataclasses.fields(SETTINGS) if f.name != "target_slots"})
    runs = []
    for settings in (absent, dataclasses.replace(SETTINGS, target_slots=0.0)):
        archive = Archive(space)
        rows = _search(space, archive, settings).run()
        runs.append((_records(archive), rows))
    (records_absent, rows_absent), (records_zero, rows_zero) = runs
    assert records_zero == records_absent
    assert [{k: v for k, v in r.items() if "seconds" not in k} for r in rows_zero] == [{k: v for k, v in r.items() if "seconds" not in k} for r in rows_absent]
    assert not any(k.startswith("search/target_slot") for r in rows_zero for k in r)


def test_half_the_batch_goes_to_moves_around_each_targets_incumbent_in_turn(caplog):
    space = _space()
    archive = Archive(space)
    caplog.set_level("INFO", logger="amq.search.loop")
    rows = _search(space, archive, HALF).run()

    n_slots = HALF.n_target_slots
    assert n_slots == 4 and [r["search/target_slots"] for r in rows[1:]] == [n_slots] * HALF.iterations
    assert "search/target_slots" not in rows[0]
    for it in range(1, HALF.iterations + 1):
        before = [r for r in archive.records if r.iteration < it]
        batch = [r for r in archive.records if r.iteration == it]
        assert len(batch) == HALF.batch_size and all(r.predicted is not None for r in batch)
        keys_before = {space.key(r.genes) for r in before}
        assert all(space.key(r.genes) not in keys_before for r in batch)
        for k, rec in enumerate(batch[:n_slots]):  # round robin: 4.0, 4.25, 4.5, 4.0
            t = TARGETS[k % len(TARGETS)]
            inc = _incumbent(before, t)
            assert rec.avg_bits <= t + 1e-9
            assert np.minimum(rec.genes - inc.genes, 0).sum() >= -HALF.moves.max_trades
        row = rows[it]
        slot_keys = {space.key(r.genes) for r in batch[:n_slots]}
        assert row["search/target_slot_incumbents"] == sum(space.key(_incumbent(before + batch, t).genes) in slot_keys for t in TARGETS)
    assert sum(r["search/target_slot_incumbents"] for r in rows[1:]) > 0  # the additive damage is easy: the moves win somewhere
    assert any(m.getMessage().startswith("targets' incumbents: 4b: iteration") for m in caplog.records)


def test_the_whole_batch_can_go_to_the_targets():
    space = _space()
    archive = Archive(space)
    rows = _search(space, archive, dataclasses.replace(SETTINGS, target_slots=1.0, iterations=1)).run()
    assert rows[1]["search/target_slots"] == SETTINGS.batch_size == rows[1]["n_new"]


def test_a_run_resumed_after_a_crash_mid_iteration_proposes_the_same_batches(tmp_path):
    space = _space()
    reference = Archive(space)
    _search(space, reference, HALF).run()

    path = tmp_path / "archive.jsonl"
    n_before_crash = 3 + HALF.n_initial_random + HALF.batch_size + 2  # 2 evaluations into iteration 2: inside its target slots
    with pytest.raises(Interrupted):
        _search(space, Archive(space, path), HALF, crash_after=n_before_crash).run()
    archive = Archive(space, path)  # a new process: the archive file is all it has
    archive.load("jsd")
    assert max(r.iteration for r in archive.records) == 2
    _search(space, archive, HALF).run(start_iteration=2)
    assert _records(archive) == _records(reference)
