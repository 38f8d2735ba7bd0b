"""The predictor's within-bits accuracy pooled over iterations: each archived record keeps the
prediction that proposed it, the figure survives save/load and a resume, and a predictor that only
knows bits scores 0 on it.

Real-shaped data: SmolLM2-135M's 210 linears (30 blocks x q/k/v/o/gate/up/down at their real
shapes), {3, 4, 8} bits at group 64, the most sensitive linears keeping {4, 8}; an additive damage
with pairwise interactions stands in for the JSD, and the reference's RBF predictor proposes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import smollm2_linears

from amq.predictors.accuracy import pooled_scores, within_bits_tau
from amq.predictors.rbf import RBFPredictor
from amq.search.archive import Archive
from amq.search.evaluator import Evaluation, measured
from amq.search.loop import IterativeSearch, SearchSettings
from amq.search.nsga import NSGA2Settings
from amq.search.space import SearchSpace

SETTINGS = SearchSettings(n_initial_random=20, iterations=5, batch_size=8, nsga=NSGA2Settings(pop_size=24, n_gen=3), bits_window=(3.5, 5.5))
POOLED = ("predictor/kendall_tau_within_bits_pooled", "predictor/pairs_within_bits_pooled", "predictor/rel_error_near_targets_pooled", "predictor/n_pooled")


def _space() -> SearchSpace:
    lin = smollm2_linears()
    damage = _damage(len(lin))
    pruned = [lin[i].name for i in np.argsort(damage)[-45:]]
    return SearchSpace(lin, [3, 4, 8], 64, pruned=pruned, keep_top=2)


def _damage(n: int) -> np.ndarray:
    return np.random.default_rng(0).lognormal(-7, 1.0, n)


class Interrupted(Exception):
    """Stands in for a crash in the middle of an iteration."""


def _search(space: SearchSpace, archive: Archive, crash_after: int | None = None) -> IterativeSearch:
    """The loop on an additive damage with interactions; with `crash_after`, the evaluation after that many raises."""
    damage = _damage(len(space.linears))
    mix = np.random.default_rng(1).normal(0, 0.3, len(space.linears))
    calls = [0]

    def evaluate(genes: np.ndarray) -> Evaluation:
        calls[0] += 1
        if crash_after is not None and calls[0] > crash_after:
            raise Interrupted
        x = damage * 4.0 ** -space.gene_bits(genes)[0].astype(float)
        return measured(float(x.sum() * (1 + (mix * x).sum() / x.sum())), 0.01, "jsd")

    return IterativeSearch(space, evaluate, lambda seed: RBFPredictor(seed=seed, device="cpu"), SETTINGS, archive, "jsd", [4.0, 4.5, 5.0], seed=3)


def _pooled(rows: list[dict]) -> list[tuple]:
    return [tuple(r.get(k) for k in POOLED) for r in rows]


# ---------------------------------------------------------------------------- the scores
def test_a_bits_only_predictor_scores_zero_pooled_and_pairs_across_iterations_would_not():
    """Bits-only predictors refitted each iteration on better data shift down with the archive; a pair
    across iterations would reward that shift, so pooled pairs stay inside one iteration."""
    rng = np.random.default_rng(0)
    its = np.repeat(np.arange(1, 11), 12)
    bits = rng.uniform(3.5, 5.5, len(its))
    interaction = rng.normal(0, 1, len(its))
    actual = np.exp(-bits) * (1 + 0.3 * interaction) * 0.9**its  # later iterations find better configurations
    bits_only = np.exp(-np.floor(bits * 4) / 4) * 0.9**its  # constant within one bin of one iteration
    s = pooled_scores(bits_only, actual, bits, its, targets=[4.0, 4.5, 5.0])
    assert s["predictor/kendall_tau_within_bits_pooled"] == pytest.approx(0.0)
    assert s["predictor/pairs_within_bits_pooled"] > 40 and s["predictor/n_pooled"] == len(its)
    assert within_bits_tau(bits_only, actual, bits)[0] > 0.2  # pairs across iterations: rewarded for the shift
    informed = pooled_scores(actual * (1 + 0.05 * rng.normal(0, 1, len(its))), actual, bits, its, targets=[4.0, 4.5, 5.0])
    assert informed["predictor/kendall_tau_within_bits_pooled"] > 0.7
    assert informed["predictor/rel_error_near_targets_pooled"] < s["predictor/rel_error_near_targets_pooled"]


def test_pooled_scores_skip_non_finite_and_say_when_there_is_nothing():
    s = pooled_scores(np.array([0.1, np.nan, 0.3]), np.array([0.2, 0.1, np.inf]), np.array([4.0, 4.0, 4.0]), np.array([1, 1, 1]))
    assert s == {
        "predictor/kendall_tau_within_bits_pooled": None,
        "predictor/pairs_within_bits_pooled": 0,
        "predictor/rel_error_near_targets_pooled": None,
        "predictor/n_pooled": 1,
    }


# ---------------------------------------------------------------------------- the archive
def test_predictions_round_trip_and_old_lines_load_without_one(tmp_path):
    space = _space()
    path = tmp_path / "archive.jsonl"
    archive = Archive(space, path)
    genes = [space.uniform(b) for b in space.bit_choices] + [space.random(np.random.default_rng(0), 3)[i] for i in range(3)]
    predicted = [None, None, None, 0.0123456789012345, float("nan"), 1e-9]
    for i, (g, p) in enumerate(zip(genes, predicted)):
        archive.add(g, Evaluation(0.01 * (i + 1), 1.0), int(p is not None), "jsd", p)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    del lines[-1]["predicted"]  # a line written before the field existed
    path.write_text("".join(json.dumps(d) + "\n" for d in lines))

    loaded = Archive(space, path)
    assert loaded.load("jsd") == len(genes)
    assert [r.predicted for r in loaded.records] == [None, None, None, 0.0123456789012345, None, None]
    assert [r.predicted for r in archive.records] == [None, None, None, 0.0123456789012345, None, 1e-9]


# ---------------------------------------------------------------------------- the loop
def test_every_proposed_record_carries_its_proposal_time_prediction_and_rows_pool_them(tmp_path):
    space = _space()
    archive = Archive(space)
    rows = _search(space, archive).run()
    initial = [r for r in archive.records if r.iteration == 0]
    proposed = [r for r in archive.records if r.iteration > 0]
    assert initial and all(r.predicted is None for r in initial)
    assert proposed and all(r.predicted is not None and r.predicted > 0 for r in proposed)
    assert all(k not in rows[0] for k in POOLED)
    n_pooled = [r["predictor/n_pooled"] for r in rows[1:]]
    assert n_pooled == sorted(n_pooled) and n_pooled[-1] == len(proposed)
    assert rows[-1]["predictor/pairs_within_bits_pooled"] >= sum(r["predictor/pairs_within_bits"] for r in rows[1:])
    assert rows[-1]["predictor/pairs_within_bits_pooled"] > rows[-1]["predictor/pairs_within_bits"]
    # the stored value is what the predictor of that iteration said, before the evaluation
    last = [r for r in archive.records if r.iteration == SETTINGS.iterations]
    X, y, _ = archive.arrays(before_iteration=SETTINGS.iterations)
    refit = RBFPredictor(seed=3 * 100_003 + SETTINGS.iterations, device="cpu").fit(space.features(X[np.isfinite(y)]), y[np.isfinite(y)])
    np.testing.assert_allclose([r.predicted for r in last], refit.predict(space.features(np.stack([r.genes for r in last]))), rtol=1e-9)


def test_a_run_resumed_after_a_crash_mid_iteration_pools_as_an_uninterrupted_one(tmp_path, caplog):
    space = _space()
    reference = _search(space, Archive(space)).run()

    path = tmp_path / "archive.jsonl"
    n_before_crash = SETTINGS.n_initial_random + 3 + 2 * SETTINGS.batch_size + 3  # 3 evaluations into iteration 3
    with pytest.raises(Interrupted):
        _search(space, Archive(space, path), crash_after=n_before_crash).run()
    archive = Archive(space, path)  # a new process: the archive file is all it has
    archive.load("jsd")
    assert max(r.iteration for r in archive.records) == 3
    caplog.set_level("INFO", logger="amq.search.loop")
    resumed = _search(space, archive).run(start_iteration=3)

    assert _pooled(resumed) == _pooled(reference[3:])
    assert reference[-1]["predictor/pairs_within_bits_pooled"] > 0
    line = [m.getMessage() for m in caplog.records if m.getMessage().startswith(f"iteration {SETTINGS.iterations}/")][0]
    r = reference[-1]
    assert f"pooled {r['predictor/kendall_tau_within_bits_pooled']:.2f} ({r['predictor/pairs_within_bits_pooled']} pairs)" in line
