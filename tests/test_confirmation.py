"""The confirmation pass (`search.confirm`): each target's near-tied configurations re-measured on
other calibration windows after the search, and the pick over all windows is what summary.json
and finalize ship. Real SmolLM2, smoke budget."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from conftest import CONFIRM, CONFIRM_SAMPLES, SMOKE, run_cli_in_process, search_in_process
from omegaconf import OmegaConf

from amq.config import compose
from amq.errors import ConfigError
from amq.finalize.selection import read_candidates, select_for_targets
from amq.io import read_jsonl
from amq.run.resume import check_resumable, comparable_settings
from amq.search.confirmation import CONFIRM_FILE, near_ties

pytestmark = pytest.mark.slow


def _lines(run_dir) -> list[dict]:
    return [{k: v for k, v in d.items() if k != "eval_seconds"} for d in read_jsonl(run_dir / CONFIRM_FILE)]


def test_confirmation_measures_each_targets_near_ties_once_and_counts_its_tokens(confirmed_run, smoke_run):
    run_dir, summary, objects = confirmed_run
    archive, targets = objects.archive, objects.workbench.targets
    _, y, bits = archive.arrays()
    wanted = {archive.space.key(archive.records[i].genes) for t in targets for i in near_ties(y, bits, t, 3, 1.0)}
    lines = _lines(run_dir)
    assert {archive.space.key(np.array(d["genes"])) for d in lines} == wanted and len(lines) == len(wanted)
    metric_of = {archive.space.key(r.genes): r.metric for r in archive.records}
    for d in lines:  # over both sets of windows: every window counted once
        search, confirm = metric_of[archive.space.key(np.array(d["genes"]))], d["metrics"]["jsd"]
        assert d["search_metric"] == search and d["combined"] == pytest.approx((2 * search + CONFIRM_SAMPLES * confirm) / (2 + CONFIRM_SAMPLES))
        assert confirm != search  # other windows than the search's
    conf = summary["confirmation"]
    window = objects.workbench.tokens.shape[1]  # budget.seq_len tokens a window
    assert conf["measured"] == len(lines) and conf["tokens"] == len(lines) * CONFIRM_SAMPLES * window
    assert summary["true_evaluations"] == len(archive)  # the pass adds no archive record...
    same = [json.loads(line) for line in (smoke_run[0] / "archive.jsonl").read_text().splitlines()]
    assert [r["genes"] for r in read_jsonl(run_dir / "archive.jsonl")] == [r["genes"] for r in same]  # ...and changes no search result


def test_summary_and_finalize_ship_the_confirmed_pick(confirmed_run):
    run_dir, summary, objects = confirmed_run
    candidates = read_candidates(run_dir / "archive.jsonl", "jsd")
    for sel in select_for_targets(candidates, objects.workbench.targets, "with_meta"):
        confirmed = [c.confirmed for c in candidates if c.confirmed is not None and c.avg_bits <= sel.target + 1e-9]
        assert sel.candidate.confirmed == min(confirmed)  # the best over all windows, not over the search's alone
        best = summary["best_at_target"][f"{sel.target:g}"]
        assert (best["avg_bits"], best["jsd"], best["confirmed_jsd"]) == (sel.candidate.avg_bits, sel.candidate.metric, sel.candidate.confirmed)


def test_a_confirmed_runner_up_replaces_the_search_pick(confirmed_run):
    """Where the confirmation reverses the order of two near-ties, the runner-up on the search's
    windows ships; where the search's best was not confirmed, it ships as before."""
    run_dir, _, objects = confirmed_run
    candidates = read_candidates(run_dir / "archive.jsonl", "jsd")
    target = max(objects.workbench.targets)
    fitting = sorted((c for c in candidates if c.avg_bits <= target + 1e-9), key=lambda c: c.metric)
    first, second = fitting[0], fitting[1]
    reversed_ = [dataclasses.replace(c, confirmed=1.0 if c is first else 0.5 if c is second else None) for c in candidates]
    assert select_for_targets(reversed_, [target], "with_meta")[0].candidate.config == second.config
    unconfirmed = [dataclasses.replace(c, confirmed=None if c is first else 0.5 if c is second else None) for c in candidates]
    assert select_for_targets(unconfirmed, [target], "with_meta")[0].candidate.config == first.config


def test_a_resumed_run_measures_only_the_missing_confirmations(confirmed_run, tmp_path):
    """Killed while confirming (its last measurement torn, no summary): the continued run measures
    that one again, to the same value bit for bit, and ships the same picks."""
    run_dir, summary, _ = confirmed_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    text = (copy / CONFIRM_FILE).read_text()
    (copy / CONFIRM_FILE).write_text(text[: text.rstrip("\n").rfind("\n") + 1] + text.rstrip("\n").rsplit("\n", 1)[1][:20])
    (copy / "summary.json").unlink()
    resumed, _ = search_in_process([*CONFIRM, f"resume={copy}"], copy)
    assert resumed["confirmation"]["new"] == 1 and resumed["confirmation"]["measured"] == summary["confirmation"]["measured"]
    assert _lines(copy) == _lines(run_dir)
    assert resumed["best_at_target"] == summary["best_at_target"]


def test_a_run_saved_before_the_setting_resumes_without_confirmation(confirmed_run, tmp_path, compose_cfg):
    run_dir, _, _ = confirmed_run
    old = OmegaConf.load(run_dir / "config.yaml")
    del old.search["confirm"]
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(old))
    base = [*SMOKE, "seed=3"]
    check_resumable(tmp_path, comparable_settings(compose_cfg(base)), 2)  # no pass then, none now: same settings
    with pytest.raises(ConfigError, match="search.confirm.samples=2"):
        check_resumable(tmp_path, comparable_settings(compose_cfg([*base, "search.confirm.samples=2"])), 2)


def test_confirmation_windows_are_other_calibration_windows(confirmed_run, compose_cfg):
    _, _, objects = confirmed_run
    wb = objects.workbench
    metric = compose.confirmation_metric(compose_cfg(CONFIRM), wb, CONFIRM_SAMPLES)
    assert metric.tokens.shape == (CONFIRM_SAMPLES, wb.tokens.shape[1])
    assert not any(bool((row == other).all()) for row in metric.tokens for other in wb.tokens)


@pytest.mark.parametrize(
    "override, setting",
    [
        ("search.confirm.samples=-1", "search.confirm.samples"),
        ("search.confirm.candidates=1", "search.confirm.candidates"),
        ("search.confirm.band=0", "search.confirm.band"),
        ("search.confirm.band=1.5", "search.confirm.band"),
        ("search.confirm.samples=two", "search.confirm.samples"),
    ],
)
def test_bad_confirmation_settings_are_one_clear_line(override, setting, tmp_path, monkeypatch, capfd):
    proc = run_cli_in_process([*SMOKE, override], tmp_path, monkeypatch, capfd)
    errors = [line for line in proc.stderr.splitlines() if "[ERROR]" in line]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert errors[0].split("] - ", 1)[1].startswith(f"{setting}:") and "(valid: " in errors[0], errors[0]
