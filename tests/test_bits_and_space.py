import numpy as np
import pytest

from amq.bits import BitConfig, average_bits
from amq.errors import ConfigError, InvalidArgument
from amq.modeling.discovery import LinearInfo
from amq.search.space import SearchSpace, shared_groups


def _linears(blocks: int = 2) -> list[LinearInfo]:
    roles = [
        ("self_attn.q_proj", 64, 64),
        ("self_attn.k_proj", 64, 32),
        ("self_attn.v_proj", 64, 32),
        ("self_attn.o_proj", 64, 64),
        ("mlp.gate_proj", 64, 128),
        ("mlp.up_proj", 64, 128),
        ("mlp.down_proj", 128, 64),
    ]
    return [LinearInfo(f"model.layers.{b}.{r}", b, r, i, o) for b in range(blocks) for r, i, o in roles]


def test_reference_bit_accounting():
    lin = _linears()
    numels = {li.name: li.numel for li in lin}
    for b, expected in [(2, 2.25), (3, 3.25), (4, 4.25)]:
        assert average_bits({n: b for n in numels}, numels, 128) == pytest.approx(expected)
        assert average_bits({n: b for n in numels}, numels, 128, with_meta=False) == pytest.approx(b)


def test_space_avg_bits_matches_reference_formula():
    lin = _linears()
    space = SearchSpace(lin, [2, 3, 4], 128, pruned=[lin[0].name])
    rng = np.random.default_rng(0)
    genes = space.random(rng, 20)
    numels = {li.name: li.numel for li in lin}
    for g, got in zip(genes, space.avg_bits(genes)):
        assert got == pytest.approx(average_bits(space.to_bits(g), numels, 128))
    assert space.bits_range()[1] == pytest.approx(4.25)
    assert space.to_bits(space.uniform(2))[lin[0].name] == 4  # pinned stays at the highest width


def test_genes_roundtrip_and_bitconfig_versioned():
    space = SearchSpace(_linears(), [3, 4, 8], 64)
    g = space.random(np.random.default_rng(1), 1)[0]
    cfg = space.to_config(g)
    assert np.array_equal(space.from_bits(cfg.bits), g)
    d = cfg.to_dict()
    assert d["version"] == 1 and BitConfig.from_dict(d) == cfg
    with pytest.raises(ValueError):
        BitConfig.from_dict({**d, "version": 99})


def test_shared_groups_fuse_qkv_and_gate_up():
    lin = _linears(blocks=2)
    groups = shared_groups(lin, [["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]])
    assert len(groups) == 2 * 4  # qkv, o, gate_up, down per block
    assert ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"] in groups
    # pinning one member pins the whole fused group
    space = SearchSpace(lin, [2, 3, 4], 32, pruned=["model.layers.0.self_attn.k_proj"], share_patterns=[["q_proj", "k_proj", "v_proj"]])
    assert {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"} <= set(space.pinned)


def test_targets_outside_range_rejected():
    space = SearchSpace(_linears(), [2, 3, 4], 128)
    assert space.check_targets([2.5, 3.0]) == [2.5, 3.0]
    with pytest.raises(ConfigError, match="^targets: .*2.250 to 4.250"):
        space.check_targets([5.0])


def test_space_needs_two_bit_widths():
    with pytest.raises(ConfigError, match="^bit_choices: "):
        SearchSpace(_linears(), [4], 128)


def test_share_group_pattern_matching_no_linear_is_refused():
    lin = _linears()
    with pytest.raises(InvalidArgument, match=r"^share_groups: nonexistent matches no linear of the model") as info:
        SearchSpace(lin, [2, 3, 4], 32, share_patterns=[["q_proj", "nonexistent"]])
    assert info.value.argument == "share_groups"
    assert info.value.valid == "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
    with pytest.raises(InvalidArgument, match="is a single role, not a group"):
        SearchSpace(lin, [2, 3, 4], 32, share_patterns=["q_proj", "k_proj"])


def test_share_group_absent_from_the_layout_is_allowed():
    # An MLP of fc1/fc2 (OPT) or an already fused gate_up_proj (Phi-3): no gate/up pair to keep together.
    lin = [li for li in _linears() if not li.role.endswith(("gate_proj", "up_proj"))]
    space = SearchSpace(lin, [2, 3, 4], 32, share_patterns=[["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]])
    assert space.n_genes == 2 * 3  # qkv, o, down per block
