"""The plots a user reads: front.png with its targets and uniform baselines, and the finalize charts
drawn from evaluation.json. Fast: fake archives and reports in the shape the real writers produce."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from amq.evaluation.report import fidelity, write_report
from amq.finalize.charts import PERPLEXITY_VS_BITS, PROXY_VS_PERPLEXITY, write_charts
from amq.finalize.stage import Finalizer
from amq.modeling.discovery import LinearInfo
from amq.run import outputs as outputs_module
from amq.run.outputs import RunOutputs, uniform_points
from amq.search.archive import Archive
from amq.search.evaluator import Evaluation
from amq.search.space import SearchSpace

PNG = b"\x89PNG\r\n\x1a\n"
METRIC = "jsd"


def _archive(tmp_path) -> Archive:
    """The uniform widths (as the initial design has them), random mixes, and one failed evaluation."""
    space = SearchSpace([LinearInfo(f"model.layers.{b}.l{i}", b, f"l{i}", 64, 64) for b in range(3) for i in range(4)], [3, 4, 8], 64)
    archive = Archive(space, tmp_path / "archive.jsonl")
    for b, value in zip(space.bit_choices, (0.3, 0.08, 0.002)):
        archive.add(space.uniform(b), Evaluation(value, 1.0), 0, METRIC)
    rng = np.random.default_rng(0)
    for i, g in enumerate(space.random(rng, 12)):
        if g not in archive:
            bits = float(space.avg_bits(g))
            archive.add(g, Evaluation(4.0 ** -(bits - 3) * 0.3, 1.0), 1 + i // 4, METRIC)
    archive.add(np.arange(space.n_genes) % 3, Evaluation(float("inf"), 1.0, failure="overflow"), 4, METRIC)
    return archive


def test_front_plot_marks_targets_and_uniform_widths(tmp_path, monkeypatch):
    archive = _archive(tmp_path)
    assert [u.width for u in uniform_points(archive)] == [3, 4, 8]
    seen = {}
    real = outputs_module.plot_front

    def spy(*args, **kwargs):
        seen["args"] = args
        real(*args, **kwargs)

    monkeypatch.setattr(outputs_module, "plot_front", spy)
    out = RunOutputs(tmp_path / "run")
    rows = out.write_front(archive, METRIC, "toy", targets=[4.0, 4.5])
    assert rows and (out.path("front.png")).read_bytes()[:8] == PNG
    targets, uniform = seen["args"][-2:]
    assert list(targets) == [4.0, 4.5]
    assert [(u.width, u.metric) for u in uniform] == [(3, 0.3), (4, 0.08), (8, 0.002)]
    out.write_front(archive, METRIC, "toy")  # the old signature: no targets
    assert out.path("front.png").stat().st_size > 0


def _row(kind: str, bits: float, proxy: float | None, ppl: dict[str, float] | None, **extra) -> dict:
    """A row exactly as the finalize stage builds it (its own method, so the keys can't drift)."""
    evaluation = {"perplexity": {t: {"perplexity": v} for t, v in ppl.items()}} if ppl else None
    return Finalizer._row(SimpleNamespace(metric_name=METRIC), kind, (bits, bits - 0.5), proxy, evaluation, **extra)


def _report(tmp_path, rows: list[dict]) -> dict:
    """evaluation.json as the stage writes it, read back (charts see what a later reader sees)."""
    report = {
        "model": "toy",
        "quantizer": {"name": "rtn"},
        "bits_convention": "with_meta",
        "protocol": None,
        "rows": rows,
        "proxy_fidelity": fidelity(rows, "proxy_" + METRIC),
        "seconds": 1.0,
    }
    write_report(tmp_path, report)
    return json.loads((tmp_path / "evaluation.json").read_text())


def _ppl(scale: float) -> dict[str, float]:
    return {"wikitext": 20.0 * scale, "c4": 30.0 * scale}


def test_finalize_charts_are_written_next_to_evaluation_json(tmp_path):
    rows = [
        _row("target", 4.0, 0.05, _ppl(1.3), target=4.0, dir="models/4"),
        _row("target", 4.5, 0.02, _ppl(1.1), target=4.5, dir="models/4.5"),
        _row("front", 3.6, 0.15, _ppl(2.0)),
        _row("unquantized", 16.0, 0.0, _ppl(1.0)),
        _row("uniform", 3.5, 0.3, _ppl(3.0)),
        _row("uniform", 4.5, 0.08, _ppl(1.4)),
    ]
    written = write_charts(_report(tmp_path, rows), tmp_path)
    assert [p.name for p in written] == [PERPLEXITY_VS_BITS, PROXY_VS_PERPLEXITY]
    for p in written:
        assert p.read_bytes()[:8] == PNG
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_report_without_evaluations_writes_no_chart(tmp_path, caplog):
    rows = [_row("target", 4.0, 0.05, None, target=4.0), _row("target", 4.5, 0.02, None, target=4.5), _row("front", 3.6, 0.15, None)]
    with caplog.at_level(logging.INFO, logger="amq.finalize.charts"):
        assert write_charts(_report(tmp_path, rows), tmp_path) == []
    assert not list(tmp_path.glob("*.png"))
    assert PERPLEXITY_VS_BITS in caplog.text and PROXY_VS_PERPLEXITY in caplog.text


def test_too_few_points_for_the_proxy_chart_still_draw_perplexity(tmp_path):
    rows = [_row("target", 4.0, 0.05, _ppl(1.3), target=4.0), _row("uniform", 4.5, None, _ppl(1.4)), _row("unquantized", 16.0, 0.0, _ppl(1.0))]
    assert [p.name for p in write_charts(_report(tmp_path, rows), tmp_path)] == [PERPLEXITY_VS_BITS]


def test_predictor_plot_appears_once_a_predictor_proposed(tmp_path):
    archive = _archive(tmp_path)
    out = RunOutputs(tmp_path / "run")
    assert out.write_predictor_plot(archive, METRIC, "toy") is None  # initial design only: nothing to show
    assert not out.path("predictor.png").exists()
    space = archive.space
    rng = np.random.default_rng(1)
    for g in space.random(rng, 6):
        if g not in archive:
            bits = float(space.avg_bits(g))
            archive.add(g, Evaluation(4.0 ** -(bits - 3) * 0.3, 1.0), 5, METRIC, predicted=4.0 ** -(bits - 3) * 0.25)
    path = out.write_predictor_plot(archive, METRIC, "toy")
    assert path == out.path("predictor.png") and path.read_bytes()[:8] == PNG


class _Tracker:
    """What an observer hands the tracker: (kind, step, image name or None)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, str | None]] = []

    def log(self, row, step):
        self.calls.append(("log", step, None))

    def log_front(self, front, metric_name, image, step):
        self.calls.append(("front", step, None if image is None else image.name))

    def log_image(self, key, image, step):
        self.calls.append(("image", step, image.name))


def _observe(tmp_path, plot_every_s: float, clock: list[float], monkeypatch) -> tuple[RunOutputs, _Tracker, list[int]]:
    """Three iterations ten (fake) seconds apart through the observer a search gives its run directory; returns what it
    drew after each (front.png's modification counter) and the tracker's calls."""
    from amq.run import session as session_module
    from amq.run.session import IterationObserver, RunSession

    monkeypatch.setattr(session_module.time, "monotonic", lambda: clock[0])
    for name in ("plot_front", "plot_predictions"):  # what is drawn when, not the drawing (tested above)
        monkeypatch.setattr(outputs_module, name, lambda path, *args, **kwargs: Path(path).write_bytes(PNG))
    session = RunSession(tmp_path / "run")
    session.outputs = RunOutputs(session.dir)
    tracker = _Tracker()
    archive = _archive(tmp_path)
    space = archive.space
    for g in space.random(np.random.default_rng(1), 6):  # configurations a predictor proposed: predictor.png has points
        if g not in archive:
            bits = float(space.avg_bits(g))
            archive.add(g, Evaluation(4.0 ** -(bits - 3) * 0.3, 1.0), 5, METRIC, predicted=4.0 ** -(bits - 3) * 0.25)
    observer = IterationObserver(session.outputs, [], METRIC, "toy", "fp", 0, tracker, [4.0], plot_every_s)
    drawn = []
    for it in range(3):
        clock[0] += 10.0
        observer({"iteration": it, "hypervolume": 0.5}, archive)
        drawn.append(session.outputs.path("front.png").exists())
        session.outputs.path("front.png").unlink(missing_ok=True)
    front = session.outputs.write_front(archive, METRIC, "toy", [4.0])  # the search's end, as train_search writes it
    observer.finish(front)
    return session.outputs, tracker, drawn


def test_plots_are_redrawn_at_most_every_plot_every_s_and_always_at_the_end(tmp_path, monkeypatch):
    out, tracker, drawn = _observe(tmp_path / "a", 25.0, [0.0], monkeypatch)
    assert drawn == [False, False, True]  # 10 s, 20 s: too soon; 30 s: drawn
    assert [c for c in tracker.calls if c[0] == "front"] == [("front", 0, None), ("front", 1, None), ("front", 2, "front.png")]
    assert ("image", 2, "predictor.png") in tracker.calls and out.path("predictor.png").is_file()
    assert all(out.path(n).is_file() for n in ("front.json", "front.csv", "metrics.jsonl", "state.json"))  # written every iteration

    out, tracker, drawn = _observe(tmp_path / "b", 1000.0, [0.0], monkeypatch)  # never due: the end draws the last iteration's
    assert drawn == [False, False, False]
    fronts = [c for c in tracker.calls if c[0] == "front"]
    assert fronts[-1] == ("front", 2, "front.png") and all(c[2] is None for c in fronts[:-1])
    assert tracker.calls[-1] == ("image", 2, "predictor.png") and out.path("front.png").is_file()

    _, tracker, drawn = _observe(tmp_path / "c", 0.0, [0.0], monkeypatch)  # 0: after every iteration, and nothing left for the end
    assert drawn == [True, True, True]
    assert [c[2] for c in tracker.calls if c[0] == "front"] == ["front.png"] * 3
