"""The archive file: what a crash can leave behind is repaired, what it can't is refused."""

from __future__ import annotations

import math

import numpy as np
import pytest

from amq.errors import ConfigError
from amq.modeling.discovery import LinearInfo
from amq.search.archive import Archive
from amq.search.evaluator import Evaluation, measured
from amq.search.space import SearchSpace


def _space() -> SearchSpace:
    return SearchSpace([LinearInfo(f"model.layers.{b}.l{i}", b, f"l{i}", 64, 64) for b in range(3) for i in range(4)], [3, 4, 8], 64)


def _filled(tmp_path, n: int = 4) -> tuple[Archive, list[np.ndarray]]:
    space = _space()
    archive = Archive(space, tmp_path / "archive.jsonl")
    genes = [np.full(space.n_genes, i % 3) for i in range(n - 1)] + [np.arange(space.n_genes) % 3]
    for i, g in enumerate(genes):
        archive.add(g, Evaluation(0.1 * (i + 1), 1.0, reused=i == 1), i // 2, "jsd")
    return archive, genes


def _reload(tmp_path) -> Archive:
    archive = Archive(_space(), tmp_path / "archive.jsonl")
    archive.load("jsd")
    return archive


def test_round_trip_keeps_values_flags_and_iterations(tmp_path):
    archive, _ = _filled(tmp_path)
    again = _reload(tmp_path)
    assert [(r.metric, r.iteration, r.reused, r.failure) for r in again.records] == [(r.metric, r.iteration, r.reused, r.failure) for r in archive.records]


def test_torn_last_line_is_dropped_and_the_file_repaired(tmp_path):
    _filled(tmp_path)
    path = tmp_path / "archive.jsonl"
    text = path.read_text()
    path.write_text(text + text.splitlines()[0][:30])  # a crash in the middle of an append
    assert len(_reload(tmp_path)) == 4
    assert path.read_text() == text  # new appends start on a clean line


def test_damaged_line_before_the_last_is_refused(tmp_path):
    _filled(tmp_path)
    path = tmp_path / "archive.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = lines[1][:20] + "\n"
    path.write_text("".join(lines))
    with pytest.raises(ConfigError, match="line 2 is damaged"):
        _reload(tmp_path)


def test_a_line_written_twice_counts_once(tmp_path):
    _filled(tmp_path)
    path = tmp_path / "archive.jsonl"
    path.write_text(path.read_text() + path.read_text().splitlines(keepends=True)[2])
    assert len(_reload(tmp_path)) == 4


def test_failed_evaluation_is_stored_with_its_reason(tmp_path):
    space = _space()
    archive = Archive(space, tmp_path / "archive.jsonl")
    archive.add(space.uniform(3), measured(float("nan"), 1.0, "jsd"), 0, "jsd")
    (rec,) = _reload(tmp_path).records
    assert math.isinf(rec.metric) and rec.failure == "jsd is nan (not finite)"
    assert '"jsd": null' in (tmp_path / "archive.jsonl").read_text()
