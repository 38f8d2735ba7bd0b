"""The serving benchmark's CPU-side pieces (scripts/bench_serving.py, no GPU needed): its mixed
allocations spend the target's bits, use only the widths asked for (`--widths 2 4 8`: no 3-bit
layers), and with shared siblings give each block's q/k/v and gate/up one width, so every set
stacks; its report puts each mixed point against uniform 4-bit (issue target: none slower)."""

from __future__ import annotations

import pytest
from conftest import load_script, main_in_process

ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPES = {"q_proj": 4096 * 4096, "k_proj": 4096 * 4096, "v_proj": 4096 * 4096, "o_proj": 4096 * 4096}
SHAPES |= {"gate_proj": 11008 * 4096, "up_proj": 11008 * 4096, "down_proj": 4096 * 11008}


@pytest.fixture(scope="module")
def bench_serving():
    with pytest.MonkeyPatch.context() as mp:
        yield load_script("bench_serving.py", mp)


def _numel(blocks: int = 32) -> dict[str, int]:
    attn = {"q_proj", "k_proj", "v_proj", "o_proj"}
    return {f"model.layers.{i}.{'self_attn' if r in attn else 'mlp'}.{r}": SHAPES[r] for i in range(blocks) for r in ROLES}


def _avg(alloc: dict[str, int], numel: dict[str, int]) -> float:
    return sum(alloc[n] * numel[n] for n in numel) / sum(numel.values())


@pytest.mark.parametrize("widths", [(2, 3, 4, 8), (2, 4, 8)])
@pytest.mark.parametrize("share", [False, True])
def test_allocation_spends_the_target_on_the_asked_widths(bench_serving, widths, share):
    numel = _numel()
    for target in (2.5, 3.0, 3.5):
        alloc = bench_serving.allocate(numel, target, widths, share=share)
        assert set(alloc.values()) <= set(widths) and len(set(alloc.values())) > 1
        avg = _avg(alloc, numel)
        assert target - 0.1 < avg <= target + 1e-9  # within one gate/up set's step of the budget
        if share:
            for i in range(32):
                block = {n.rsplit(".", 1)[-1]: b for n, b in alloc.items() if f".{i}." in n}
                assert block["q_proj"] == block["k_proj"] == block["v_proj"] and block["gate_proj"] == block["up_proj"]


def _row(config: str, b1: float, b16: float, prefill: float) -> dict:
    return {"config": config, "kernels": "planes", "decode_b1": b1, "decode_b16": b16, "prefill": prefill}


def test_report_gives_each_mixed_point_against_uniform_four(bench_serving):
    rows = [
        _row("uniform 4", 300.0, 4000.0, 30000.0),
        _row("mixed 3", 330.0, 3000.0, float("nan")),
        {"config": "mixed 2.5", "kernels": "planes", "error": "OOM"},
    ]
    lines = bench_serving.against_uniform_four(rows)
    assert lines[-1] == "| mixed 3 | planes | 1.100x | 0.750x | - |"  # a NaN (not measured) shows as '-'
    assert not any("mixed 2.5" in line for line in lines)  # a failed configuration has no ratios
    assert bench_serving.against_uniform_four([_row("mixed 3", 1.0, 1.0, 1.0)]) == []  # no uniform 4-bit row: no table


@pytest.mark.parametrize("tile", ["384", "16", "2048"])
def test_a_tile_no_layout_has_is_refused_before_anything_runs(bench_serving, tile, tmp_path, capfd):
    proc = main_in_process("bench_serving.py", bench_serving.main, ["--micro-tiles", tile, "--json", str(tmp_path / "out.json")], capfd)
    assert proc.returncode == 2 and f"--micro-tiles: {tile} (valid: a power of two from 32 to 1024)" in proc.stderr
    assert not any(tmp_path.iterdir())
