"""Final quantizers (HQQ, GPTQ, AWQ) and packed layers, on the real SmolLM2 and real calibration text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from amq.config.compose import build
from amq.data.corpora import keep_parsed
from amq.data.tokens import CalibrationSpec, calibration_windows
from amq.errors import ConfigError
from amq.modeling.discovery import discover_layout, find_decoder_blocks
from amq.quantizers.awq import output_error
from amq.quantizers.calibration import InputStats, capture_block_calls
from amq.quantizers.grid import (
    ClipSearch,
    GridForm,
    from_codes,
    grouped,
    held_scale,
    held_zero,
    lp_error,
    minmax_grid,
    rtn_quant,
    search_shrink,
    shrink_ratios,
    significant_digits,
    to_codes,
)
from amq.quantizers.hqq import HQQFinalizer
from amq.quantizers.hqq_proxy import HQQQuantizer
from amq.quantizers.packed import GroupQuant, PackedLinear, pack_codes, packed_bytes, replace_linears, unpack_codes

GROUP = 64
FINALIZERS = ("hqq", "gptq", "awq")


# ---------------------------------------------------------------- packing (no model needed)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("shape", [(7, 13), (3, 64), (1, 1)])
def test_pack_unpack_round_trip(bits, shape):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, shape, generator=g).to(torch.uint8)
    packed = pack_codes(codes, bits)
    n = shape[0] * shape[1]
    assert packed.dtype == torch.uint8 and packed.numel() == -(-n // 8) * bits  # whole 8-code chunks
    assert torch.equal(unpack_codes(packed, bits, shape), codes)


def test_packed_linear_state_dict_round_trips_through_safetensors(tmp_path: Path):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(37, 3 * GROUP, generator=g)
    q = rtn_quant(weight, 3, GROUP)
    q.input_scale = (torch.rand(3 * GROUP, generator=g) + 0.5).half()
    bias = torch.randn(37, generator=g).to(torch.bfloat16)
    layer = PackedLinear.from_quant(q, bias, torch.bfloat16)
    save_file(layer.state_dict(), tmp_path / "layer.safetensors")

    loaded = PackedLinear.empty(3 * GROUP, 37, 3, GROUP, has_bias=True, has_input_scale=True, dtype=torch.bfloat16)
    loaded.load_state_dict(load_file(tmp_path / "layer.safetensors"))
    x = torch.randn(2, 5, 3 * GROUP, generator=g).to(torch.bfloat16)
    assert torch.equal(loaded(x), layer(x))
    exact = F.linear(x.float(), q.dequantize(), bias.float())
    assert float((layer(x).float() - exact).norm() / exact.norm()) < 1e-2  # bf16 matmul of the same weight
    assert "bits=3" in repr(loaded) and "group_size=64" in repr(loaded)


# ---------------------------------------------------------------- the real model
@pytest.fixture(scope="module")
def smollm2(compose_cfg):
    cfg = compose_cfg(["model=smollm2", "logger=none"])
    lm = build(cfg.model.source, "model").load(Path(cfg.paths.cache_dir))
    splits = keep_parsed(build(cfg.data, "data"), cfg.paths.cache_dir).load()
    calib = calibration_windows(lm.tokenizer, splits.calibration, CalibrationSpec(8, 128, seed=0), lm.add_bos)
    return lm, discover_layout(lm.model), calib, compose_cfg


def _finalizer(compose_cfg, name: str, *overrides: str):
    return build(compose_cfg(["logger=none", f"finalizer={name}", *overrides]).finalizer, "finalizer")


class _Reached(Exception):
    """Raised by the hook once block `block` has run: the blocks after it would not change its output."""


def _block_output(model, calib: torch.Tensor, block: int) -> torch.Tensor:
    """Hidden states leaving decoder block `block` on the calibration windows (float32); the forward
    stops there (the later blocks and the head are most of its cost)."""
    _, blocks = find_decoder_blocks(model)
    out = []

    def keep(module, args, output):
        out.append(output[0] if isinstance(output, tuple) else output)
        raise _Reached

    hook = blocks[block].register_forward_hook(keep)
    try:
        with torch.no_grad():
            model(input_ids=calib, use_cache=False)
    except _Reached:
        pass
    finally:
        hook.remove()
    return out[0].float()


def _reconstruction_error(model, quants: dict[str, GroupQuant], calib: torch.Tensor, block: int) -> float:
    """Mean squared error of block `block`'s output with `quants` swapped in, against the original."""
    ref = _block_output(model, calib, block)
    originals = {}
    try:
        for n, q in quants.items():
            m = model.get_submodule(n)
            originals[n] = m.weight
            m.weight = torch.nn.Parameter(q.dequantize().to(m.weight.dtype), requires_grad=False)
        return float((_block_output(model, calib, block) - ref).pow(2).mean())
    finally:
        for n, w in originals.items():
            model.get_submodule(n).weight = w


@pytest.fixture(scope="module")
def two_blocks_4bit(smollm2):
    """Every quantizer (and RTN) on the first two blocks at uniform 4-bit, plus the weights before."""
    lm, layout, calib, compose_cfg = smollm2
    bits = {li.name: 4 for li in layout.linears if li.block < 2}
    before = {n: lm.model.get_submodule(n).weight.detach().clone() for n in bits}
    quants = {name: _finalizer(compose_cfg, name).quantize(lm.model, layout, bits, GROUP, calib) for name in FINALIZERS}
    quants["rtn"] = {n: rtn_quant(w, 4, GROUP) for n, w in before.items()}
    return bits, before, quants


def test_quantizers_leave_the_model_unchanged(smollm2, two_blocks_4bit):
    lm = smollm2[0]
    _, before, _ = two_blocks_4bit
    for n, w in before.items():
        assert torch.equal(lm.model.get_submodule(n).weight, w), n


def test_gptq_and_awq_reconstruct_block_outputs_better_than_calibration_free(smollm2, two_blocks_4bit):
    lm, _, calib, _ = smollm2
    _, _, quants = two_blocks_4bit
    err = {name: _reconstruction_error(lm.model, q, calib, block=1) for name, q in quants.items()}
    assert err["gptq"] < err["hqq"] and err["gptq"] < err["rtn"], err
    assert err["awq"] < err["rtn"], err


@pytest.mark.parametrize("name", FINALIZERS)
def test_group_quants_lie_on_their_grid(two_blocks_4bit, name):
    bits, before, quants = two_blocks_4bit
    for n, q in quants[name].items():
        out_f, in_f = before[n].shape
        assert q.codes.dtype == torch.uint8 and q.codes.shape == (out_f, in_f) and q.bits == bits[n]
        assert int(q.codes.max()) <= 2**q.bits - 1
        assert q.scale.dtype == q.zero.dtype == torch.float16 and q.scale.shape == (out_f, in_f // GROUP)
        assert bool((q.scale > 0).all())
        deq = (q.codes.float().view(out_f, -1, GROUP) - q.zero.float()[..., None]) * q.scale.float()[..., None]
        deq = deq.view(out_f, in_f)
        if q.input_scale is not None:
            assert name == "awq" and q.input_scale.shape == (in_f,)
            deq = deq / q.input_scale.float()
        assert torch.equal(q.dequantize(), deq)
        if q.input_scale is None:  # a loader that dequantizes in the model's dtype gets the same weights
            dt = before[n].dtype
            in_dtype = (q.codes.to(dt).view(out_f, -1, GROUP) - q.zero.to(dt)[..., None]) * q.scale.to(dt)[..., None]
            assert torch.equal(in_dtype.view(out_f, in_f), deq.to(dt)), (name, n, dt)
        # close to the weight it quantizes: within a few grid steps on average
        step = (q.scale.float() / (q.input_scale.float().view(-1, GROUP).amax(-1) if q.input_scale is not None else 1)).mean()
        assert float((q.dequantize() - before[n].float()).abs().mean()) < 2 * float(step), n


@pytest.mark.parametrize("name", FINALIZERS)
def test_integer_zero_points_are_whole_codes_and_cost_little(smollm2, two_blocks_4bit, name):
    """`finalizer.integer_zero=true`: every zero point a whole code in [0, 2^b - 1] (what a bit-packed
    compressed-tensors layer holds), the weights on that grid, and block 1's output not far from the
    original next to fractional zero points (held-out text: docs/benchmarks.md)."""
    lm, layout, calib, compose_cfg = smollm2
    bits, before, quants = two_blocks_4bit
    whole = _finalizer(compose_cfg, name, "finalizer.integer_zero=true").quantize(lm.model, layout, bits, GROUP, calib)
    for n, q in whole.items():
        z = q.zero.float()
        assert torch.equal(z, z.round()) and float(z.min()) >= 0 and float(z.max()) <= 2**q.bits - 1, n
        assert int(q.codes.max()) <= 2**q.bits - 1
        step = (q.scale.float() / (q.input_scale.float().view(-1, GROUP).amax(-1) if q.input_scale is not None else 1)).mean()
        assert float((q.dequantize() - before[n].float()).abs().mean()) < 2 * float(step), n
    fractional = quants[name]
    assert any(not torch.equal(q.zero.float(), q.zero.float().round()) for q in fractional.values())  # the default keeps them fractional
    err_whole, err_frac = (_reconstruction_error(lm.model, q, calib, block=1) for q in (whole, fractional))
    # HQQ's optimised zeros fit a block best (1.5x here), yet held out it costs 1-2% at 4 bits and gains at 3 (docs/benchmarks.md)
    assert err_whole < 2.0 * err_frac, (name, err_whole, err_frac)


def test_integer_zero_grid_rounds_the_zero_before_the_weights():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 8, 64, generator=g)
    for bits in (2, 3, 4, 8):
        scale, zero = minmax_grid(w, bits, form=GridForm(integer_zero=True))
        frac_scale, frac_zero = minmax_grid(w, bits)
        assert torch.equal(scale, frac_scale) and torch.equal(zero, zero.round())
        assert float((zero - frac_zero).abs().max()) <= 0.5 + 1e-3  # the nearest whole code (float16 rounding aside)
        codes = to_codes(w, scale, zero, bits)
        assert float((from_codes(codes, scale, zero) - w).abs().amax(-1).div(scale).max()) <= 1.0 + 1e-4  # at most a step (clipped ends)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_held_grids_dequantize_alike_in_the_model_dtype(dtype, bits):
    """(q - zero) * scale computed in bfloat16/float16, as compressed-tensors' loader does, equals
    amq's float32 dequantization rounded once, for every code; float16 grids alone do not."""
    g = torch.Generator().manual_seed(bits)
    maxq = 2**bits - 1
    raw_scale = torch.exp(torch.empty(4096).uniform_(-9, 0, generator=g))
    raw_zero = torch.empty(4096).uniform_(0, maxq, generator=g)
    q = torch.arange(maxq + 1, dtype=torch.float32)[:, None]

    def same(scale: torch.Tensor, zero: torch.Tensor) -> bool:
        in_dtype = (q.to(dtype) - zero.to(dtype)) * scale.to(dtype)
        return torch.equal(in_dtype, ((q - zero) * scale).to(dtype))

    scale = held_scale(raw_scale, dtype)
    zero = held_zero(raw_zero, bits, dtype)
    assert torch.equal(scale, scale.half().float()) and torch.equal(zero, zero.half().float())  # float16 stores them
    assert same(scale, zero)
    assert not same(raw_scale.half().float(), raw_zero.half().float())
    assert float((scale / raw_scale - 1).abs().max()) <= 2.0**-8 and float((zero - raw_zero).abs().max()) <= 2.0 ** (bits - significant_digits(dtype) - 1)
    assert torch.equal(held_scale(raw_scale), raw_scale.half().float()) and torch.equal(
        held_zero(raw_zero, bits), raw_zero.half().float()
    )  # float32: float16 only


def test_hqq_final_matches_the_proxy(smollm2):
    lm, layout, _, _ = smollm2
    name = layout.linears[0].name
    w = lm.model.get_submodule(name).weight
    q = HQQFinalizer().quantize(lm.model, layout, {name: 3}, GROUP, None)[name]
    proxy = HQQQuantizer(group_size=GROUP)
    expected = proxy.dequantize(*proxy.quantize(w, 3)).float()
    # only difference: HQQ's float32 scale and zero are stored as float16
    assert float((q.dequantize() - expected).abs().max()) < 1e-2 * float(expected.abs().max())


def test_mixed_bits_per_layer(smollm2):
    lm, layout, calib, compose_cfg = smollm2
    block0 = [li.name for li in layout.linears if li.block == 0]
    bits = {n: (3 if i % 2 else 8) for i, n in enumerate(block0)}
    quants = _finalizer(compose_cfg, "gptq").quantize(lm.model, layout, bits, GROUP, calib[:2])
    assert {n: q.bits for n, q in quants.items()} == bits
    for n, q in quants.items():
        assert int(q.codes.max()) <= 2 ** bits[n] - 1


def test_the_stage_quantizes_a_configuration_asked_for_twice_in_a_row_once(smollm2, tmp_path, caplog):
    """Two targets that select the same configuration (or a uniform baseline a target selected, right
    after it) take the calibrating quantizer's last result: the same weights, not a second GPTQ pass."""
    from amq.bits import BitConfig
    from amq.finalize.settings import FinalizeSettings
    from amq.finalize.stage import Finalizer

    lm, layout, calib, compose_cfg = smollm2
    block0 = [li.name for li in layout.linears if li.block == 0]
    first, other = (BitConfig({n: b for n in block0}, GROUP) for b in (4, 3))
    stage = Finalizer(tmp_path, lm, layout, _finalizer(compose_cfg, "gptq"), FinalizeSettings((4.0,)), None, "jsd", calib[:2])
    with caplog.at_level("INFO", logger="amq.finalize.stage"):
        a = stage._quantize(first)
        assert stage._quantize(BitConfig(dict(first.bits), GROUP)) is a  # an equal configuration, another object
        b = stage._quantize(other)
        again = stage._quantize(first)  # only the last is kept: quantized anew, to the same codes
    assert b is not a and again is not a and {q.bits for q in b.values()} == {3}
    assert all(torch.equal(again[n].codes, a[n].codes) and torch.equal(again[n].scale, a[n].scale) for n in block0)
    said = [r.getMessage() for r in caplog.records]
    assert sum("the configuration quantized last" in m for m in said) == 1
    assert sum(f"quantized {len(block0)} linears" in m for m in said) == 3


def test_a_continued_stage_keeps_only_model_folders_of_its_own_configuration_and_quantizer(smollm2, tmp_path, caplog):
    """A continued run's stage keeps models/<target>/ that its stopped process finished, but only for
    the same configuration and quantizer settings: another configuration (a search extended by
    more iterations picks anew) or other settings are quantized and written again."""
    from amq.bits import BitConfig
    from amq.finalize.selection import Candidate
    from amq.finalize.settings import FinalizeSettings
    from amq.finalize.stage import Finalizer

    lm, layout, _, compose_cfg = smollm2
    bits = {li.name: 4 for li in layout.linears if li.block == 0}  # the rest stays unquantized: a cheap model folder

    def candidate(width: int) -> Candidate:
        return Candidate(BitConfig({**bits, layout.names[0]: width}, GROUP), 4.5, 4.0, 0.1, 0)

    def stage(keep: bool, *overrides: str) -> Finalizer:
        return Finalizer(tmp_path, lm, layout, _finalizer(compose_cfg, "hqq", *overrides), FinalizeSettings((4.5,)), None, "jsd", keep_finished=keep)

    stage(False).export(4.5, candidate(4))
    written = (tmp_path / "models" / "4.5" / "bit_config.json").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="amq.finalize.stage"):
        stage(True).export(4.5, candidate(4))
        assert "models/4.5: finished by the stopped run" in caplog.text
        assert (tmp_path / "models" / "4.5" / "bit_config.json").stat().st_mtime_ns == written  # kept as it was
        caplog.clear()
        stage(True, "finalizer.integer_zero=true").export(4.5, candidate(4))  # other quantizer settings
        stage(True).export(4.5, candidate(8))  # another configuration
        assert "finished by the stopped run" not in caplog.text
    saved = json.loads((tmp_path / "models" / "4.5" / "bit_config.json").read_text())["bits"]
    assert saved[layout.names[0]] == 8


def test_packed_bytes_of_a_3bit_layer(smollm2):
    lm, layout, _, _ = smollm2
    name = layout.linears[0].name
    w = lm.model.get_submodule(name).weight
    layer = PackedLinear.from_quant(rtn_quant(w, 3, GROUP), None, torch.bfloat16)
    meta = 2 * 2 * w.shape[0] * (w.shape[1] // GROUP)  # fp16 scale + zero per group
    assert layer.qweight.numel() == w.numel() * 3 // 8
    assert packed_bytes(torch.nn.Sequential(layer)) == w.numel() * 3 // 8 + meta


def test_packed_8bit_model_matches_the_original(smollm2):
    """Real packed layers in the real model: at 8 bits its logits stay close to the bf16 model's."""
    import copy

    lm, layout, calib, _ = smollm2
    bits = {li.name: 8 for li in layout.linears if li.block < 4}
    quants = HQQFinalizer().quantize(lm.model, layout, bits, GROUP, None)
    packed = copy.deepcopy(lm.model)
    replace_linears(packed, quants, lm.model.dtype)
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == len(bits)
    with torch.no_grad():
        ref = lm.model(input_ids=calib[:2]).logits.float().log_softmax(-1)
        got = packed(input_ids=calib[:2]).logits.float().log_softmax(-1)
    kl = float((ref.exp() * (ref - got)).sum(-1).mean())
    assert kl < 5e-3, kl


def test_awq_model_exports_and_reloads_with_identical_outputs(smollm2, tmp_path: Path):
    """Packed layers with AWQ input scales go through export and a reload unchanged."""
    import copy

    from amq.bits import BitConfig
    from amq.quantizers.export import load_quantized, write_model_dir

    lm, layout, calib, compose_cfg = smollm2
    bits = {li.name: (3 if li.block == 0 else 4) for li in layout.linears if li.block < 2}
    quants = _finalizer(compose_cfg, "awq").quantize(lm.model, layout, bits, GROUP, calib[:2])
    packed = copy.deepcopy(lm.model)
    replace_linears(packed, quants, lm.model.dtype)
    write_model_dir(tmp_path / "m", packed, lm.tokenizer, BitConfig(bits, GROUP), {"name": "awq"})
    reloaded = load_quantized(tmp_path / "m")
    # SmolLM2's grouped-query attention leaves o_proj no producer to fold a scale into: it gets none;
    # down_proj's is folded into up_proj's group scales by AWQ itself, so only norm-read layers keep one
    scaled = {n.rpartition(".")[2] for n, m in reloaded.named_modules() if isinstance(m, PackedLinear) and m.input_scale is not None}
    assert scaled == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}, scaled
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=calib[:2]).logits, packed(input_ids=calib[:2]).logits)


# ---------------------------------------------------------------- range (clipping) search
def _stacked_qkv(lm, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block `block`'s q/k/v weights stacked as GPTQ solves them, grouped (out, groups, G), with
    mixed widths per row (q and v at 3 bits, k at 4) as a mixed configuration gives them."""
    attn = lm.model.model.layers[block].self_attn
    ws = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
    bits = torch.cat([torch.full((w.shape[0],), b) for w, b in zip(ws, (3, 4, 3))])
    return grouped(torch.cat(ws).float(), GROUP), bits[:, None]


@pytest.mark.parametrize("norm, weighted", [(2.4, False), (2.0, True)])
def test_range_search_never_rounds_worse_than_min_max(smollm2, norm, weighted):
    lm = smollm2[0]
    w, bits = _stacked_qkv(lm, block=2)
    col_weight = torch.linspace(0.1, 3.0, GROUP) if weighted else None  # e.g. GPTQ's loss per squared error

    def error(scale, zero):
        codes = to_codes(w, scale, zero, bits)
        assert int(codes.min()) >= 0 and bool((codes <= 2 ** bits[..., None] - 1).all())
        return lp_error(from_codes(codes, scale, zero) - w, norm, col_weight)

    plain = error(*minmax_grid(w, bits))
    searched = error(*ClipSearch(81, 0.2, norm).grid(w, bits, col_weight))
    assert bool((searched <= plain * (1 + 1e-6)).all())  # 1.0 is a candidate: never worse, row by row
    assert float(searched.sum()) < 0.95 * float(plain.sum())  # and on real weights clipping pays
    ratios = search_shrink(w, bits, shrink_ratios(81, 0.2), lambda e: lp_error(e, norm, col_weight))
    assert float(ratios.min()) >= 0.2 - 1e-6 and float(ratios.max()) == 1.0
    # scoring the candidates a few at a time chooses the same factors as scoring all at once
    few = search_shrink(w, bits, shrink_ratios(81, 0.2), lambda e: lp_error(e, norm, col_weight), max_elements=3 * w.numel())
    assert torch.equal(few, ratios)


def test_gptq_range_search_lowers_the_output_error_of_every_stage_at_3_bits(smollm2):
    """Each stage of a middle block (q/k/v, o, gate/up, down) on its real calibration inputs.

    Measured (scripts/bench_finalizers.py, docs/benchmarks.md): the search lowers held-out
    perplexity at 3 and 4 bits, but not every layer's own output error: at 4 bits and in block 0
    some stages come out up to a few percent worse, so the test pins 3 bits on block 15.
    """
    lm, _, calib, compose_cfg = smollm2
    block = lm.model.model.layers[15]
    stages = [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)]
    stats = {s[0]: InputStats.empty(block.get_submodule(s[0]).in_features, calib.device) for s in stages}
    hooks = [block.get_submodule(n).register_forward_hook(lambda m, a, o, st=st: st.add(a[0])) for n, st in stats.items()]
    try:
        with torch.no_grad():
            lm.model(input_ids=calib, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    searched = _finalizer(compose_cfg, "gptq", "finalizer.clip_search=true")
    plain = _finalizer(compose_cfg, "gptq", "finalizer.clip_search=false")
    for stage in stages:
        weights, H = [block.get_submodule(n).weight for n in stage], stats[stage[0]].hessian()
        W = torch.cat(weights).float()
        err = {}
        for name, f in (("searched", searched), ("plain", plain)):
            quants = f.quantize_stage(weights, [3] * len(weights), GROUP, stats[stage[0]])
            assert all(int(q.codes.max()) <= 7 for q in quants)
            err[name] = output_error(torch.cat([q.dequantize() for q in quants]) - W, H)  # ||X W^T - X Q^T||^2 * 2 / n
        assert err["searched"] < 0.98 * err["plain"], (stage, err)


# ---------------------------------------------------------------- bad input
def test_bad_inputs_are_clear_config_errors(smollm2):
    lm, layout, calib, compose_cfg = smollm2
    name = layout.linears[0].name
    gptq = _finalizer(compose_cfg, "gptq")
    with pytest.raises(ConfigError, match="needs calibration"):
        gptq.quantize(lm.model, layout, {name: 4}, GROUP, None)
    with pytest.raises(ConfigError, match="not decoder linears"):
        gptq.quantize(lm.model, layout, {"lm_head": 4}, GROUP, calib)
    with pytest.raises(ConfigError, match="^group_size: 100 does not divide"):
        gptq.quantize(lm.model, layout, {name: 4}, 100, calib)
    with pytest.raises(ConfigError, match="9-bit"):
        gptq.quantize(lm.model, layout, {name: 9}, GROUP, calib)
    with pytest.raises(ConfigError, match="7-bit"):
        HQQFinalizer().quantize(lm.model, layout, {name: 7}, GROUP, None)
    with pytest.raises(ConfigError, match="finalizer.damp"):
        _finalizer(compose_cfg, "gptq", "finalizer.damp=0")
    with pytest.raises(ConfigError, match="finalizer.n_grid"):
        _finalizer(compose_cfg, "awq", "finalizer.n_grid=1")


@pytest.mark.parametrize(
    "override", ["finalizer.clip_grid=1", "finalizer.clip_max_shrink=0", "finalizer.clip_max_shrink=1.5", "finalizer.clip_norm=0", "finalizer.clip_norm=9"]
)
def test_bad_range_search_settings_are_config_errors(compose_cfg, override):
    setting = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{setting}: .*\(valid: ") as info:
        _finalizer(compose_cfg, "gptq", override)
    assert info.value.setting == setting


# ---------------------------------------------------------------- another architecture
@pytest.mark.slow
@pytest.mark.heavy
def test_gemma3_blocks_get_their_own_arguments(compose_cfg):
    """Gemma3 passes per-layer rotary tables (sliding vs full attention); GPTQ must use each block's own."""
    cfg = compose_cfg(["model=gemma3_270m", "logger=none"])
    lm = build(cfg.model.source, "model").load(Path(cfg.paths.cache_dir))
    layout = discover_layout(lm.model)
    full = lm.model.config.layer_types.index("full_attention")
    calib = calibration_windows(
        lm.tokenizer, keep_parsed(build(cfg.data, "data"), cfg.paths.cache_dir).load().calibration, CalibrationSpec(4, 64, seed=0), lm.add_bos
    )
    _, blocks = find_decoder_blocks(lm.model)
    _, calls = capture_block_calls(lm.model, blocks, calib, len(calib), full)
    cos0, cos_full = calls[0][0].kwargs["position_embeddings"][0], calls[full][0].kwargs["position_embeddings"][0]
    assert not torch.equal(cos0, cos_full)

    bits = {li.name: 4 for li in layout.linears if li.block <= full}
    gptq = build(compose_cfg(["model=gemma3_270m", "logger=none", "finalizer=gptq"]).finalizer, "finalizer")
    quants = gptq.quantize(lm.model, layout, bits, GROUP, calib)
    rtn = {n: rtn_quant(lm.model.get_submodule(n).weight, 4, GROUP) for n in bits}
    assert _reconstruction_error(lm.model, quants, calib, full) < _reconstruction_error(lm.model, rtn, calib, full)


@pytest.mark.parametrize("integer_zero", [False, True])
def test_the_proxys_cached_result_is_what_the_hqq_finalizer_makes(smollm2, integer_zero):
    """`group_quant_from_proxy`: the proxy's packed HQQ result of a SmolLM2 weight (as the bank caches
    it) gives the finalizer's GroupQuant bit for bit, at every width HQQ packs; another layout is refused."""
    from amq.quantizers.hqq import group_quant_from_proxy, hqq_group_quant

    lm, layout, _, _ = smollm2
    proxy = HQQQuantizer(group_size=GROUP, axis=1, optimize=True, integer_zero=integer_zero)
    for name, bits in (
        ("model.layers.0.self_attn.k_proj", 2),
        ("model.layers.1.mlp.down_proj", 3),
        ("model.layers.2.self_attn.o_proj", 4),
        ("model.layers.3.mlp.up_proj", 8),
    ):
        weight = lm.model.get_submodule(name).weight
        got = group_quant_from_proxy(*proxy.quantize(weight.detach(), bits), weight, bits)
        want = hqq_group_quant(proxy, weight, bits)
        for field in ("codes", "scale", "zero"):
            assert torch.equal(getattr(got, field), getattr(want, field)), (name, bits, field)
        assert (got.bits, got.group_size) == (want.bits, want.group_size)
    with pytest.raises(ValueError, match="axis 1"):
        group_quant_from_proxy(*HQQQuantizer(group_size=GROUP, axis=0).quantize(weight.detach(), 4), weight, 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_the_proxys_cached_result_lands_on_the_weights_device_cuda(bits):
    """A search on the GPU caches its proxy results, read back onto the CPU; the finalize stage's
    GroupQuant from them sits on the GPU with the weight, and equals HQQ's there bit for bit."""
    from amq.quantizers.hqq import group_quant_from_proxy, hqq_group_quant

    weight = torch.randn(192, 256, generator=torch.Generator().manual_seed(bits)).to("cuda", torch.bfloat16)
    proxy = HQQQuantizer(group_size=GROUP, axis=1, optimize=True)
    w_q, meta = proxy.quantize(weight, bits)
    cached = (w_q.cpu(), {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in meta.items()})  # as ProxyBank caches it
    got, want = group_quant_from_proxy(*cached, weight, bits), hqq_group_quant(proxy, weight, bits)
    for field in ("codes", "scale", "zero"):
        assert getattr(got, field).device == weight.device and torch.equal(getattr(got, field), getattr(want, field)), field


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("axis", [1, 0])
def test_proxy_with_integer_zero_points_packs_whole_codes(bits, axis):
    """The proxy (`quantizer.integer_zero=true`): HQQ's packed result dequantizes to (codes - zero) *
    scale with whole-code zeros, near the weight; its cache key differs only when it is on."""
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(bits))
    q = HQQQuantizer(group_size=GROUP, axis=axis, optimize=True, integer_zero=True)
    packed, meta = q.quantize(w, bits)
    codes, meta_u = q.quantize(w, bits, bitpack=False)
    z = meta["zero"]
    assert torch.equal(z, z.round()) and float(z.min()) >= 0 and float(z.max()) <= 2**bits - 1
    assert torch.equal(meta_u["zero"], z) and int(codes.max()) <= 2**bits - 1
    assert torch.equal(q.dequantize(packed, meta), ((codes - z) * meta["scale"]).reshape(w.shape))
    step = float(meta["scale"].mean())
    assert float((q.dequantize(packed, meta) - w).abs().mean()) < step
    assert "integer_zero" in q.settings() and "integer_zero" not in HQQQuantizer(group_size=GROUP).settings()
