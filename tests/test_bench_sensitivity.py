"""The agreement measures of scripts/bench_sensitivity.py on hand-made tables (no model)."""

import pytest

from amq.bench.sensitivity_agreement import jaccard, mean_table, rank_agreement, replicate_windows, spread
from amq.errors import InvalidArgument
from amq.search.sensitivity import SensitivityTable


def table(damage: dict[str, float], baseline: float = 0.1, seconds: float = 1.0) -> SensitivityTable:
    return SensitivityTable(damage, baseline, 3, 8, "jsd", seconds)


def test_mean_table_is_the_table_of_the_union_of_equal_windows():
    """Probe and baseline are means per token, so damage (their difference) averages too; seconds add."""
    a, b = table({"x": 1.0, "y": 3.0}, 0.2, 2.0), table({"x": 3.0, "y": 1.0}, 0.4, 3.0)
    m = mean_table([a, b])
    assert m.damage == {"x": 2.0, "y": 2.0}
    assert m.baseline == pytest.approx(0.3) and m.seconds == 5.0 and (m.low_bits, m.high_bits) == (3, 8)
    assert mean_table([a]) == a
    with pytest.raises(InvalidArgument):
        mean_table([a, table({"x": 1.0})])
    with pytest.raises(InvalidArgument):
        mean_table([])


def test_replicates_are_disjoint_consecutive_windows():
    assert replicate_windows(8, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert replicate_windows(8, 3) == [[0, 1, 2], [3, 4, 5]]
    assert replicate_windows(2, 1) == [[0], [1]]
    for bad in (0, 9):
        with pytest.raises(InvalidArgument):
            replicate_windows(8, bad)


def test_rank_agreement_and_jaccard():
    ref = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}
    assert rank_agreement({k: 10 * v for k, v in ref.items()}, ref) == {"kendall_tau": pytest.approx(1.0), "spearman": pytest.approx(1.0)}
    assert rank_agreement({k: -v for k, v in ref.items()}, ref)["kendall_tau"] == pytest.approx(-1.0)
    swapped = rank_agreement({**ref, "a": 2.5}, ref)  # one adjacent swap of four: tau = (5 - 1) / 6
    assert swapped["kendall_tau"] == pytest.approx(4 / 6) and swapped["spearman"] == pytest.approx(0.8)
    with pytest.raises(InvalidArgument):
        rank_agreement({"a": 1.0}, ref)
    assert jaccard(["a", "b"], ["b", "c"]) == pytest.approx(1 / 3)
    assert jaccard([], []) == 1.0


def test_spread():
    assert spread([1.0]) == {"mean": 1.0, "std": 0.0, "min": 1.0, "max": 1.0}
    s = spread([1.0, 3.0])
    assert (s["mean"], s["min"], s["max"]) == (2.0, 1.0, 3.0) and s["std"] == pytest.approx(2**0.5)
