"""The evaluation cache: keyed by content, shared across seeds, safe under parallel writers, and never
trusting an entry that fails its checksum."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp

import numpy as np
import pytest
from conftest import SMOKE

from amq.config import compose
from amq.config.compose import evaluation_context, prepare, prune
from amq.search.archive import Archive
from amq.search.eval_cache import DiskEvaluationCache, NoEvaluationCache, with_cache
from amq.search.evaluator import ProxyEvaluator

CONTEXT = {"model": "m", "quantizer": {"group_size": 64}, "metric": {"kind": "jsd"}, "tokens": "t"}
BITS = {"model.layers.0.q_proj": 3, "model.layers.0.k_proj": 8}


def test_entry_round_trip_and_context_separation(tmp_path):
    cache = DiskEvaluationCache(str(tmp_path))
    store = cache.store(CONTEXT)
    assert store.get(BITS) is None
    store.put(BITS, 0.0123456789012345, 1.5)
    assert store.get(BITS) == (0.0123456789012345, 1.5)
    assert store.get({**BITS, "model.layers.0.k_proj": 4}) is None
    assert cache.store({**CONTEXT, "tokens": "other"}).get(BITS) is None  # other data, other folder
    assert json.loads((store.folder / "context.json").read_text()) == CONTEXT
    assert NoEvaluationCache().store(CONTEXT) is None


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text[: len(text) // 2],  # truncated
        lambda text: text.replace("0.0123", "0.0124"),  # a changed value: checksum mismatch
        lambda text: "\x00" * len(text),  # garbage
        lambda text: text.replace('"version": 1', '"version": 0'),
        lambda text: "",
    ],
    ids=["truncated", "edited value", "garbage", "other version", "empty"],
)
def test_damaged_entry_is_not_trusted(tmp_path, caplog, damage):
    store = DiskEvaluationCache(str(tmp_path)).store(CONTEXT)
    store.put(BITS, 0.0123456789, 1.0)
    path = store.path_of(BITS)
    path.write_text(damage(path.read_text()))
    with caplog.at_level(logging.WARNING, logger="amq.search.eval_cache"):
        assert store.get(BITS) is None
    assert "corrupted or truncated" in caplog.text
    store.put(BITS, 0.0123456789, 1.0)  # measured again: the entry is rewritten and trusted
    assert store.get(BITS) == (0.0123456789, 1.0)


def test_entry_of_another_configuration_is_not_trusted(tmp_path):
    store = DiskEvaluationCache(str(tmp_path)).store(CONTEXT)
    other = {**BITS, "model.layers.0.k_proj": 4}
    store.put(BITS, 0.5, 1.0)
    store.put(other, 0.25, 1.0)
    moved = sorted(store.folder.rglob("*/*.json"))
    moved[0].write_bytes(moved[1].read_bytes())  # a file copied over another keeps its own key inside
    assert sum(store.get(b) is None for b in (BITS, other)) == 1


def test_unwritable_cache_only_costs_reuse(tmp_path, caplog):
    store = DiskEvaluationCache(str(tmp_path)).store(CONTEXT)
    store.path_of(BITS).parent.parent.mkdir(parents=True, exist_ok=True)
    store.path_of(BITS).parent.write_text("a file where the entry's folder should be")
    with caplog.at_level(logging.WARNING, logger="amq.search.eval_cache"):
        store.put(BITS, 0.5, 1.0)
    assert "cannot write" in caplog.text and store.get(BITS) is None


def _writer(folder: str, value: float, n: int) -> None:
    store = DiskEvaluationCache(folder).store(CONTEXT)
    for _ in range(n):
        store.put(BITS, value, 1.0)


def test_parallel_writers_never_leave_a_bad_entry(tmp_path):
    """Jobs of a sweep publishing the same entry at once: readers see a whole entry every time."""
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), 0.75, 200)) for _ in range(3)]
    for p in procs:
        p.start()
    store = DiskEvaluationCache(str(tmp_path)).store(CONTEXT)
    seen = [store.get(BITS) for _ in range(300)]
    for p in procs:
        p.join()
    assert all(p.exitcode == 0 for p in procs)
    assert {s for s in seen if s is not None} <= {(0.75, 1.0)}
    assert store.get(BITS) == (0.75, 1.0)
    assert not [p for p in store.folder.rglob("*") if p.name.endswith(".tmp")], "a temporary file was left behind"


@pytest.mark.slow
@pytest.mark.heavy  # make test-all: the cache's keying is checked by the fast tests of this file
def test_another_seed_reuses_what_the_first_measured(compose_cfg, tmp_path):
    """Two initial designs (seeds 0 and 1) on the real model: the uniform and sensitivity-seeded
    configurations they share are measured once; a damaged entry is measured again, to the same value."""
    cfg = compose_cfg([*SMOKE, f"paths.output_dir={tmp_path}"])
    wb = prepare(cfg)
    plan = compose.plan(cfg)
    table, space = prune(wb, plan.pruning, plan.sensitivity_samples, None)
    initial = ["budget.n_initial_random=4", "budget.iterations=0", "budget.batch_size=4", "search.sensitivity_seeds=2"]
    cached = ["eval_cache=disk", f"eval_cache.dir={tmp_path / 'evaluations'}"]
    cache = compose.plan(compose_cfg([*SMOKE, *cached])).eval_cache

    def initial_design(seed: int) -> Archive:
        """The initial design as amq-search assembles it (uniform, sensitivity seeds, random), through the disk cache."""
        archive = Archive(space, tmp_path / f"archive{seed}.jsonl")
        compose.assemble_search(compose.plan(compose_cfg([*SMOKE, *initial, *cached, f"seed={seed}"])), wb, table, space, archive).run()
        return archive

    first = initial_design(0)
    assert not any(r.reused for r in first.records)
    second = initial_design(1)
    measured = {space.key(r.genes): r.metric for r in first.records}
    reused = [r for r in second.records if r.reused]
    shared = [r for r in second.records if space.key(r.genes) in measured]
    assert len(reused) == len(shared) >= len(space.bit_choices)  # at least the uniform configurations
    assert all(r.metric == measured[space.key(r.genes)] for r in reused)
    assert all(
        json.loads(line).get("reused", False) == (space.key(np.array(json.loads(line)["genes"])) in measured)
        for line in (tmp_path / "archive1.jsonl").read_text().splitlines()
    )

    store = cache.store(evaluation_context(wb))
    victim = first.records[0]
    path = store.path_of(space.to_bits(victim.genes))
    path.write_text(path.read_text()[:40])
    again = with_cache(ProxyEvaluator(wb.bank, wb.metric, space), cache, evaluation_context(wb), space)(victim.genes)
    assert not again.reused and again.value == victim.metric
    assert store.get(space.to_bits(victim.genes))[0] == victim.metric
