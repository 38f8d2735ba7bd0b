"""scripts/bench_table_noise.py's comparison: a probe window's damages against the other windows'
mean, as probed, as shrunk and as estimated from output errors, and whether the standard errors
predict the difference."""

import numpy as np
from conftest import load_script


def test_noisy_middle_widths_are_scored_against_the_other_windows(monkeypatch):
    bench = load_script("bench_table_noise.py", monkeypatch)
    rng = np.random.default_rng(0)
    names = [f"model.layers.{i}.mlp.{r}" for r in ("gate_proj", "up_proj") for i in range(40)]
    tokens, windows = 256, 4
    low = rng.uniform(0.01, 0.06, len(names))
    true = {2: low, 3: 0.12 * low * rng.lognormal(0.0, 0.2, len(names))}
    spread = 0.06  # per-token spread of each probe's change: a standard error of spread / 16 per window
    diffs = {b: true[b][:, None] + rng.normal(0.0, spread, (len(names), windows * tokens)) for b in (2, 3)}
    stats = {b: bench.window_stats(d, windows) for b, d in diffs.items()}
    means, errors = {b: s[0] for b, s in stats.items()}, {b: s[1] for b, s in stats.items()}
    assert means[3].shape == (len(names), windows) and np.allclose(errors[3], spread / np.sqrt(tokens), rtol=0.2)
    # output errors whose ratio is each linear's true 3-bit share of its 2-bit damage
    output = {2: dict(zip(names, 1.0 + low)), 3: dict(zip(names, 1.0 + true[3])), 4: dict.fromkeys(names, 1.0)}
    rows = bench.compare(1, names, [2, 3, 4], means, errors, output)
    by_bits = {r["bits"]: r for r in rows}
    assert set(by_bits) == {2, 3} and all(r["window"] == 1 for r in rows)
    assert "mse shrunk" not in by_bits[2]  # the lowest width is never shrunk
    mid = by_bits[3]
    assert 0.7 < mid["error_scale"] < 1.3  # independent noise of the stated size: the errors are right
    assert mid["mse shrunk"] < mid["mse probed"] and mid["spearman shrunk"] > mid["spearman probed"]
    assert mid["spearman estimated"] > mid["spearman shrunk"]  # the precise lowest width, scaled by the right ratio
    assert mid["negative"] == int((means[3][:, 1] < 0).sum())
