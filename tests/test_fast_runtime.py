"""The fast runtime (amq.runtime): converted layers compute what PackedLinear computes.

On the CPU (CI): the bit-plane layout round-trips every width; each kernel's layer matches
PackedLinear on random codes with fractional zero points; and a real SmolLM2 (its first 4 blocks) whose decoder
linears are packed at the served widths (round-to-nearest, cheap) gives the same logits after
`convert` within bf16 tolerance. The GPU tests run the Triton kernels and tinygemm on CUDA and
skip cleanly without it.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SMOKE, load_script, run_script

from amq.config.compose import build
from amq.modeling.discovery import discover_layout
from amq.quantizers.grid import rtn_quant
from amq.quantizers.packed import GroupQuant, PackedLinear, packed_bytes, replace_linears
from amq.runtime import PlanesLinear, TinyGemmLinear, convert, served
from amq.runtime.fuse import SiblingGroup, SiblingLinear, stack
from amq.runtime.layout import SPLIT_MAX, TILE_ROWS_MAX, pack_planes, plane_widths, span_tiles, tile_size, unpack_planes

GROUP = 64
SERVED = (2, 3, 4, 8)
# variants of the CUDA tile kernel that bench_tile_kernel.py --variant times beside the shipped one,
# and of the CUDA GEMV (gemv/), which bench_gemv.py --variant times
VARIANTS_DIR = Path(__file__).resolve().parents[1] / "scripts" / "kernel_variants"
KERNEL_VARIANTS = sorted(VARIANTS_DIR.glob("*.cu"))
GEMV_VARIANTS = sorted((VARIANTS_DIR / "gemv").glob("*.cu"))
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _random_layer(bits: int, out_f: int = 96, in_f: int = 256, group: int = GROUP, device: str = "cpu", awq: bool = False) -> PackedLinear:
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=g, dtype=torch.uint8)
    scale = (torch.rand(out_f, in_f // group, generator=g) * 0.02 + 1e-3).half()
    zero = (torch.rand(out_f, in_f // group, generator=g) * (2**bits - 1)).half()  # fractional, like HQQ's
    input_scale = (torch.rand(in_f, generator=g) + 0.5).half() if awq else None
    q = GroupQuant(codes, scale, zero, bits, group, input_scale)
    bias = torch.randn(out_f, generator=g, dtype=torch.bfloat16)
    return PackedLinear.from_quant(q, bias, torch.bfloat16).to(device)


@pytest.mark.parametrize("bits", range(1, 9))
def test_tile_interleaved_planes_round_trip_and_hold_exactly_the_bits(bits):
    for in_f, group in ((320, 64), (11008, 128), (576, 64)):
        codes = torch.randint(0, 2**bits, (24, in_f), dtype=torch.uint8)
        tile = tile_size(in_f, bits, group)
        assert tile is not None and in_f % tile == 0
        planes = pack_planes(codes, bits, tile)
        assert sum(plane_widths(bits)) == bits
        held = sum(p.numel() * p.element_size() for p in planes) * 8
        spans = [-(-(in_f // tile) // r) * r * tile for r in span_tiles(bits)]  # narrow planes pad their last span
        assert held == 24 * sum(p * n for p, n in zip(plane_widths(bits), spans)) and held <= codes.numel() * bits * 1.25
        if all(n == in_f for n in spans):
            assert held == codes.numel() * bits
        assert torch.equal(unpack_planes(planes, bits, in_f, tile), codes.to(torch.int32))
    # the layout the kernels rely on: code e of a tile in word e % W at bit p * (e // W)
    codes = (torch.arange(256) % 16).to(torch.uint8).view(1, 256)
    word = pack_planes(codes, 4, 256)[0]
    assert all((int(word[0, e % 32]) >> (4 * (e // 32))) & 15 == e % 16 for e in range(256))
    # 3 = 2 + 1: column c of tile t = 2 u + h is one 48-bit string, code e = j * W + c at bits 3 j: the
    # wide word t * W + c, then bits h * 16 .. of the narrow word u * W + c (a span of two tiles)
    codes = torch.randint(0, 8, (1, 1024), dtype=torch.uint8)
    wide, narrow = pack_planes(codes, 3, 256)
    assert wide.shape == (1, 64) and narrow.shape == (1, 32)  # 16 words a tile; 16 words a span of two tiles
    for t, c in ((0, 0), (1, 5), (2, 15), (3, 2)):
        string = (int(wide[0, t * 16 + c]) & 0xFFFFFFFF) | ((int(narrow[0, (t // 2) * 16 + c]) >> ((t % 2) * 16)) & 0xFFFF) << 32
        assert [(string >> (3 * j)) & 7 for j in range(16)] == [int(codes[0, t * 256 + j * 16 + c]) for j in range(16)]


@pytest.mark.parametrize("bits", SERVED)
@pytest.mark.parametrize("awq", [False, True])
def test_planes_layer_is_packed_linear_on_cpu(bits, awq):
    layer = _random_layer(bits, in_f=512, awq=awq)
    fast = PlanesLinear(layer)
    assert torch.equal(fast.weight_float(), layer.weight_float())  # fractional zeros exact
    x = torch.randn(3, 5, 512, dtype=torch.bfloat16)
    assert _rel(fast(x), layer(x)) < 1e-2
    held = {n: b.numel() * b.element_size() for n, b in fast.named_buffers() if n != "bias"}
    scratch = held.pop("split_partial") + held.pop("split_count")  # the kernels' split-K scratch, not weights
    assert sum(held.values()) == packed_bytes(layer)  # two tiles of 256: no narrow-plane padding
    assert scratch <= layer.out_features * (4 * SPLIT_MAX * TILE_ROWS_MAX + 1)
    assert "split_partial" not in fast.state_dict()


@pytest.mark.parametrize("bits", SERVED)
def test_a_larger_tile_holds_the_same_layer(bits):
    """Tiles above 256 (to measure them: bench_serving --micro-tiles) lay out the same codes: runs of
    twice the codes, the same weight bit for bit and the same products on the CPU path."""
    layer = _random_layer(bits, in_f=1024, group=128)
    default, large = PlanesLinear(layer), PlanesLinear(layer, max_tile=512)
    assert (default.tile, large.tile) == (256, 512)
    assert torch.equal(large.weight_float(), layer.weight_float())
    x = torch.randn(2, 3, 1024, dtype=torch.bfloat16)
    assert torch.equal(large(x), default(x))
    assert tile_size(1024, bits, 64, max_tile=512) == (256 if bits == 8 else 512)  # 8 bits at 512: runs of 128 codes, two groups
    with pytest.raises(ValueError, match="power of two"):
        tile_size(1024, bits, 128, max_tile=384)


def test_tinygemm_layer_is_packed_linear_within_bf16_rounding_on_cpu():
    layer = _random_layer(4)
    fast = TinyGemmLinear(layer)
    eye = torch.eye(256, dtype=torch.bfloat16)
    w_fast = (torch.ops.aten._weight_int4pack_mm_for_cpu(eye, fast.packed, GROUP, fast.scale_offset)).float().t()
    w = layer.weight_float()
    scale = layer.scale.float().repeat_interleave(GROUP, dim=1)
    # bf16 scale, offset and arithmetic: a few bf16 ulps of the group's largest weight (8 steps of
    # `scale`), i.e. a small fraction of one quantization step (measured 0.089 on this test's layer)
    err = ((w_fast - w).abs() / scale).max()
    assert err < 0.125
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    assert _rel(fast(x), layer(x)) < 1e-2


def test_served_widths_and_limits():
    for b in SERVED:
        assert served(b, 128, device="cpu") is not None
    assert served(4, 128, device="cpu", kernels={4: "tinygemm_int4"}) == "tinygemm_int4"
    assert served(4, 48, device="cpu", kernels={4: "tinygemm_int4"}) is None  # tinygemm's groups are 32..256
    assert served(3, 128, dtype=torch.float32, device="cpu") is None
    assert served(7, 128, device="cpu") is None and served(16, 128, device="cpu") is None
    with pytest.raises(ValueError, match="unknown kernel"):
        served(4, 128, device="cpu", kernels={4: "marlin"})


BLOCKS = 4  # SmolLM2's first blocks: every linear shape of the model, at a seventh of the CPU time


@pytest.fixture(scope="module")
def smollm2(compose_cfg):
    cfg = compose_cfg(["model=smollm2", *SMOKE])
    model = copy.deepcopy(build(cfg.model.source, "model").load(Path(cfg.paths.cache_dir)).model)
    model.model.layers = model.model.layers[:BLOCKS]
    model.config.num_hidden_layers = BLOCKS
    return model


def _packed_model(model: torch.nn.Module, bits_of) -> torch.nn.Module:
    linears = discover_layout(model).linears
    packed = copy.deepcopy(model).to(torch.bfloat16)
    quants = {li.name: rtn_quant(model.get_submodule(li.name).weight.detach(), bits_of(i), GROUP) for i, li in enumerate(linears)}
    replace_linears(packed, quants, torch.bfloat16)
    return packed


@pytest.mark.parametrize("kernels", [None, {4: "tinygemm_int4"}], ids=["default", "tinygemm"])
def test_converted_smollm2_matches_packed_logits_for_every_width(smollm2, kernels, caplog):
    packed = _packed_model(smollm2, lambda i: SERVED[i % len(SERVED)])  # every served width, mixed
    fast = copy.deepcopy(packed)
    with caplog.at_level(logging.WARNING, logger="amq.runtime"):
        chosen = convert(fast, kernels)
    assert "fallback" not in chosen.values() and not caplog.records
    assert not any(isinstance(m, PackedLinear) for m in fast.modules())
    scratch = {id(m.split_partial) for m in fast.modules() if isinstance(m, PlanesLinear)}
    assert len(scratch) == 1  # one split-K scratch for the whole model, not one per layer
    if kernels:
        assert {k for n, k in chosen.items() if packed.get_submodule(n).bits == 4} == {"tinygemm_int4"}
    ids = torch.arange(100, 164).view(1, -1)
    with torch.no_grad():
        a, b = packed(input_ids=ids).logits.float(), fast(input_ids=ids).logits.float()
    # on the CPU the planes layer multiplies by the very same bf16 weight (measured: identical
    # logits); tinygemm rounds scale and offset to bf16 (measured 3.1%, argmax agreement 0.89)
    assert _rel(b, a) < (5e-2 if kernels else 2e-2)
    assert (a[0].argmax(-1) == b[0].argmax(-1)).float().mean() > (0.8 if kernels else 0.9)  # measured 0.89 / 1.0


def test_load_quantized_fast_runtime_reloads_an_exported_model(smollm2, tmp_path):
    """`amq.load_quantized(dir, runtime="fast")`: the exported directory comes back with kernel layers
    and the logits of the default runtime; an unknown runtime is refused before loading."""
    from transformers import AutoTokenizer

    from amq.bits import BitConfig
    from amq.errors import InvalidArgument
    from amq.quantizers.export import load_quantized, write_model_dir

    packed = _packed_model(smollm2, lambda i: SERVED[i % len(SERVED)])
    bits = {n: m.bits for n, m in packed.named_modules() if isinstance(m, PackedLinear)}
    tokenizer = AutoTokenizer.from_pretrained(Path(smollm2.name_or_path)) if Path(str(smollm2.name_or_path)).is_dir() else None
    if tokenizer is None:
        pytest.skip("the cached model directory has no tokenizer")
    write_model_dir(tmp_path / "m", packed, tokenizer, BitConfig(bits, GROUP), {"name": "rtn"})
    fast, plain = load_quantized(tmp_path / "m", runtime="fast"), load_quantized(tmp_path / "m")
    assert not any(isinstance(m, PackedLinear) for m in fast.modules())
    ids = torch.arange(100, 164).view(1, -1)
    with torch.no_grad():
        assert _rel(fast(input_ids=ids).logits, plain(input_ids=ids).logits) < 2e-2
    with pytest.raises(InvalidArgument, match="runtime"):
        load_quantized(tmp_path / "m", runtime="turbo")


def test_width_without_kernel_falls_back_and_says_so(smollm2, caplog):
    packed = _packed_model(smollm2, lambda i: 7 if i == 0 else 4)
    with caplog.at_level(logging.WARNING, logger="amq.runtime"):
        chosen = convert(packed)
    assert list(chosen.values()).count("fallback") == 1 and "no fast kernel" in caplog.text


def test_serve_with_fast_says_when_siblings_may_not_stack(caplog):
    """Without shared-precision groups the check says that q/k/v and gate/up may not stack, and
    which search makes them; with them it says nothing."""
    from types import SimpleNamespace

    from amq.config.compose import check_serve_with

    layout = SimpleNamespace(linears=[SimpleNamespace(in_features=576), SimpleNamespace(in_features=1536)])  # SmolLM2's widths
    with caplog.at_level(logging.INFO, logger="amq.config.compose"):
        check_serve_with("fast", [2, 3, 4], 64, layout, shared=False)
        assert "search=amq_fused" in caplog.text
        caplog.clear()
        check_serve_with("fast", [2, 3, 4], 64, layout, shared=True)
        check_serve_with(None, [2, 3, 4], 64, layout)
    assert "amq_fused" not in caplog.text


def test_sibling_group_computes_once_per_input_and_stays_right_on_other_inputs(monkeypatch):
    """Stacked q/k/v: one product per input for all three members; a member called on another
    input, on the same tensor changed in place, or twice, gets a fresh product, never a stale one."""
    layers = [PlanesLinear(_random_layer(4, out_f=n)) for n in (96, 32, 32)]
    group = SiblingGroup(stack(layers), [m.out_features for m in layers])
    members = [SiblingLinear(group, i) for i in range(3)]
    calls = []
    real = PlanesLinear.forward
    monkeypatch.setattr(PlanesLinear, "forward", lambda self, x: calls.append(1) or real(self, x))
    x, other = torch.randn(2, 5, 256, dtype=torch.bfloat16), torch.randn(2, 5, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        ys = [m(x) for m in members]
        assert len(calls) == 1 and group._output is None  # one product; released once all took theirs
        for y, layer in zip(ys, layers):
            assert y.shape == (2, 5, layer.out_features) and torch.equal(y, real(layer, x))
        assert torch.equal(members[0](x), ys[0]) and torch.equal(members[1](other), real(layers[1], other))
        assert torch.equal(members[1](x), ys[1]) and len(calls) == 4  # k on another input, then back on x: fresh each time
        members[0](x), members[0](x)  # the same member twice: the second is a fresh product
        x.mul_(2)
        assert torch.equal(members[2](x), real(layers[2], x))  # changed in place: not the stale rows


def test_convert_stacks_siblings_of_one_width_and_keeps_the_logits(smollm2):
    """Uniform 4-bit SmolLM2: q/k/v and gate/up become one layer each (no copy of their planes) with
    the unstacked model's logits; in a mixed model only the sets that share a width are stacked."""
    packed = _packed_model(smollm2, lambda i: 4)
    plain, fused = copy.deepcopy(packed), copy.deepcopy(packed)
    convert(plain, fuse=False)
    convert(fused)
    groups = [m for m in fused.modules() if isinstance(m, SiblingGroup)]
    assert len(groups) == 2 * BLOCKS and not any(isinstance(m, SiblingGroup) for m in plain.modules())
    assert isinstance(fused.model.layers[0].self_attn.k_proj, SiblingLinear)

    def plane_bytes(model):
        return sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "plane" in n)

    assert plane_bytes(fused) == plane_bytes(plain)
    ids = torch.arange(100, 164).view(1, -1)
    with torch.no_grad():
        assert torch.equal(fused(input_ids=ids).logits, plain(input_ids=ids).logits)
    mixed = _packed_model(smollm2, lambda i: 8 if i % 7 == 4 else 4)  # gate of every block at 8 bits
    convert(mixed)
    assert [type(m).__name__ for m in mixed.modules() if isinstance(m, SiblingGroup)] == ["SiblingGroup"] * BLOCKS
    assert isinstance(mixed.model.layers[0].mlp.up_proj, PlanesLinear)


def test_convert_stacks_the_members_of_a_set_that_share_a_width(smollm2):
    """q/k/v at 4/3/4 bits: q and v become one layer, k stays apart, and the logits are the
    unstacked model's; a set whose members all differ stacks nothing."""
    packed = _packed_model(smollm2, lambda i: {1: 3, 4: 2, 5: 3}.get(i % 7, 4))  # k 3 bits; gate 2, up 3
    plain, fused = copy.deepcopy(packed), copy.deepcopy(packed)
    convert(plain, fuse=False)
    convert(fused)
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert isinstance(attn.q_proj, SiblingLinear) and isinstance(attn.v_proj, SiblingLinear) and attn.q_proj.group is attn.q_proj_v_proj_stacked
    assert isinstance(attn.k_proj, PlanesLinear) and attn.k_proj.bits == 3
    assert isinstance(mlp.gate_proj, PlanesLinear) and isinstance(mlp.up_proj, PlanesLinear)  # 2 and 3 bits: nothing to stack
    assert sum(isinstance(m, SiblingGroup) for m in fused.modules()) == BLOCKS
    ids = torch.arange(100, 164).view(1, -1)
    with torch.no_grad():
        assert torch.equal(fused(input_ids=ids).logits, plain(input_ids=ids).logits)


@cuda
def test_served_on_cuda():
    assert all(served(b, 128) is not None for b in SERVED)


@cuda
@pytest.mark.parametrize("bits", SERVED)
@pytest.mark.parametrize("rows", [1, 7, 16, 100])
@pytest.mark.parametrize("max_tile", [256, 512])
def test_triton_kernels_match_packed_linear_on_cuda(bits, rows, max_tile):
    layer = _random_layer(bits, out_f=384, in_f=512, group=128, device="cuda")
    fast = PlanesLinear(layer, max_tile=max_tile)
    assert fast.tile == max_tile
    x = torch.randn(rows, 512, dtype=torch.bfloat16, device="cuda")
    ref = x.float() @ layer.weight_float().t() + layer.bias.float()
    assert _rel(fast(x), ref) < 1e-2


# ---------------------------------------------------------------------------- the CUDA GEMV (one row)
def test_cuda_gemv_is_off_with_its_variable_and_a_failed_build_falls_back_with_one_warning(monkeypatch, caplog):
    import torch.utils.cpp_extension as cpp

    from amq.runtime import cuda_gemv

    layer = PlanesLinear(_random_layer(4, out_f=64, in_f=256, group=128))
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    assert not cuda_gemv.fits(x, layer.planes(), layer.scale, layer.zero, 4, 128, layer.tile)  # a CPU tensor: never
    assert cuda_gemv.gemv(x, layer.planes(), layer.scale, layer.zero, 4, 128, layer.tile, 64) is None
    cuda_gemv._module.cache_clear()
    try:
        monkeypatch.setenv(cuda_gemv.ENV, "0")
        assert cuda_gemv._module((9, 0)) is None  # off: nothing is built
        cuda_gemv._module.cache_clear()
        monkeypatch.delenv(cuda_gemv.ENV)

        def no_nvcc(**kwargs):
            raise RuntimeError("nvcc not found")

        monkeypatch.setattr(cpp, "load_inline", no_nvcc)
        with caplog.at_level(logging.WARNING, logger="amq.runtime"):
            assert cuda_gemv._module((9, 0)) is None and cuda_gemv._module((9, 0)) is None
        assert caplog.text.count("could not be built") == 1 and "Triton GEMV" in caplog.text
    finally:
        cuda_gemv._module.cache_clear()


def test_cuda_gemv_takes_the_group_layouts_it_was_built_for():
    from amq.runtime.cuda_gemv import GROUPS_PER_TILE, SHAPES, SOURCE, WIDTHS, _groups_per_tile, _shape_flags, block_shape

    assert [_groups_per_tile(4, 256, g) for g in (128, 256, 64)] == [2, 1, 4]
    assert _groups_per_tile(3, 64, 64) == 1 and _groups_per_tile(8, 256, 128) == 2
    assert 4 not in GROUPS_PER_TILE  # group 64 under 256-wide tiles stays on the Triton GEMV
    assert {block_shape(b) for b in WIDTHS} <= set(range(len(SHAPES)))
    assert sorted(_shape_flags(False)) == sorted(f"-DAMQ_SHAPE_{b}={block_shape(b)}" for b in WIDTHS)  # each width built at its shape
    launched = re.findall(r"SHAPE == (\d+)\) launch<P0, P1, GPT, (\d+), (\d+), (\d+), X>", SOURCE.read_text())
    assert [tuple(map(int, t[1:])) for t in sorted(launched)] == list(SHAPES)  # the .cu's shapes are SHAPES, in order


def _entry_point(path: Path, signature: str) -> str:
    """A kernel source's exported entry point, whitespace folded (a variant must declare the shipped one)."""
    text = path.read_text()
    start = text.index(signature)
    return " ".join(text[start : text.index("{", start)].split())


@pytest.mark.parametrize(
    "variants, module, signature",
    [(GEMV_VARIANTS, "cuda_gemv", "bool amq_gemv_planes("), (KERNEL_VARIANTS, "cuda_mma", "bool amq_mma_planes(")],
    ids=["gemv", "tile"],
)
def test_kernel_variants_have_the_shipped_kernels_entry_point(variants, module, signature):
    """The variants `bench_gemv.py --variant` and `bench_tile_kernel.py --variant` time beside the
    shipped kernels load through the shipped wrappers, so their entry point must be the shipped one's."""
    import importlib

    if not variants:
        pytest.skip("no variants of this kernel in scripts/kernel_variants (measured ones are removed; git history keeps them)")
    shipped = importlib.import_module(f"amq.runtime.{module}").SOURCE
    assert all(_entry_point(v, signature) == _entry_point(shipped, signature) for v in variants)


@cuda
@pytest.mark.parametrize("bits", SERVED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("source", [None, *GEMV_VARIANTS], ids=lambda s: "shipped" if s is None else s.stem)
def test_cuda_gemv_matches_packed_linear(bits, dtype, source):
    """The shipped GEMV, and each variant in scripts/kernel_variants/gemv (timed by bench_gemv.py)."""
    from amq.runtime import cuda_gemv

    source = source or cuda_gemv.SOURCE
    if not cuda_gemv.available(torch.device("cuda"), source):
        pytest.skip("the CUDA GEMV could not be built here (no nvcc?)")
    # rows no block size divides; one group per tile (576 / 64), two (512 / 128), an odd tile count (1280 / 128)
    for out_f, in_f, group in ((390, 576, 64), (384, 512, 128), (200, 1280, 128)):
        layer = _random_layer(bits, out_f=out_f, in_f=in_f, group=group, device="cuda")
        fast = PlanesLinear(layer)
        x = torch.randn(1, in_f, dtype=dtype, device="cuda")
        ref = x.float() @ layer.weight_float().t()
        y = cuda_gemv.gemv(x, fast.planes(), fast.scale, fast.zero, bits, group, fast.tile, out_f, source=source)
        assert y is not None and y.dtype == dtype and _rel(y, ref) < 1e-2, (out_f, in_f, group)
        assert _rel(fast(x), ref + layer.bias.float()) < 1e-2


@cuda
def test_cuda_gemv_build_without_the_asked_shape_returns_none_not_a_crash():
    """The default build holds each width at its own block shape only; asking it for another one
    must hand back None (the caller then uses the Triton GEMV), never abort the process."""
    from amq.runtime import cuda_gemv

    if not cuda_gemv.available(torch.device("cuda")):
        pytest.skip("the CUDA GEMV could not be built here (no nvcc?)")
    layer = _random_layer(4, out_f=384, in_f=512, group=128, device="cuda")
    fast = PlanesLinear(layer)
    x = torch.randn(1, 512, dtype=torch.float16, device="cuda")
    module = cuda_gemv._module(torch.cuda.get_device_capability(x.device))
    other = next(s for s in range(len(cuda_gemv.SHAPES)) if s != cuda_gemv.block_shape(4))
    widths = cuda_gemv.plane_widths(4)
    gpt = cuda_gemv._groups_per_tile(4, fast.tile, 128)
    args = (x, fast.planes()[0], fast.planes()[-1], fast.scale, fast.zero, widths[0], 0, 384, fast.tile, 128, gpt)
    assert module.gemv(*args, other) is None
    assert module.gemv(*args, cuda_gemv.block_shape(4)) is not None


# ------------------------------------------------------------------- the CUDA tile kernel (2-16 rows)
def test_cuda_tile_kernel_takes_only_what_it_was_built_for():
    from amq.runtime import cuda_mma

    layer = PlanesLinear(_random_layer(4, out_f=64, in_f=512, group=128))
    x = torch.randn(4, 512, dtype=torch.bfloat16)
    assert not cuda_mma.fits(x, layer.planes(), layer.scale, layer.zero, 4, 128, layer.tile)  # a CPU tensor: never
    assert cuda_mma.mma(x, layer.planes(), layer.scale, layer.zero, 4, 128, layer.tile, 64, (layer.split_partial, layer.split_count)) is None
    assert [cuda_mma.groups_served(g) for g in (32, 64, 128, 256, 512, 96, 16)] == [True] * 5 + [False] * 2
    # slices fill the GPU on layers of few rows, never more than SPLIT_MAX nor one per tile
    assert cuda_mma.split_for(4096, 4096, 132) == 4 and cuda_mma.split_for(11008, 4096, 132) == 2 and cuda_mma.split_for(22016, 4096, 132) == 1
    assert cuda_mma.split_for(384, 512, 132) == 2 and cuda_mma.split_for(4096, 11008, 16) == 1
    # products go to it only where it was measured the faster: 2 and 3 bits up to 16 rows, 4 up to 8
    assert [cuda_mma.preferred(3, m) for m in (1, 2, 16)] == [False, True, True] and cuda_mma.preferred(4, 8) and not cuda_mma.preferred(4, 9)
    assert cuda_mma.preferred(2, 16) and not cuda_mma.preferred(2, 17)
    # layers of many rows (stacked gate/up) take it at every width up to 16 rows
    assert cuda_mma.preferred(4, 16, 22016) and not cuda_mma.preferred(4, 16, 12288) and not cuda_mma.preferred(4, 1, 22016)
    assert not cuda_mma.preferred(8, 4) and not cuda_mma.preferred(8, 16, 22016) and set(cuda_mma.FASTER_UP_TO) == set(cuda_mma.WIDTHS)
    launched = re.findall(r"case (\d+): return by_rows<P0, P1, (\d+)>", cuda_mma.SOURCE.read_text())
    assert all(int(g) * int(ng) == cuda_mma.TILE for g, ng in launched) and sorted(int(g) for g, _ in launched) == [32, 64, 128]
    widths = re.findall(r"if \(p0w == (\d) && p1w == (\d)\) return by_groups", cuda_mma.SOURCE.read_text())
    assert sorted(int(a) + int(b) for a, b in widths) == list(cuda_mma.WIDTHS)  # the .cu builds exactly WIDTHS
    warps = re.search(r"constexpr int WARPS = (\d+);", cuda_mma.SOURCE.read_text())
    assert warps and 16 * int(warps.group(1)) == cuda_mma.BLOCK_ROWS  # the slices' count assumes the .cu's block


@cuda
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("rows", [2, 7, 8, 9, 16])
@pytest.mark.parametrize("source", [None, *KERNEL_VARIANTS], ids=lambda s: "shipped" if s is None else s.stem)
def test_cuda_tile_kernel_matches_packed_linear(bits, rows, source):
    """The shipped kernel, and each variant in scripts/kernel_variants (timed by bench_tile_kernel.py)."""
    from amq.runtime import cuda_mma

    source = source or cuda_mma.SOURCE
    if not cuda_mma.available(torch.device("cuda"), source):
        pytest.skip("the CUDA tile kernel could not be built here (no nvcc?)")
    # rows no block divides; 2 to 8 groups per tile and whole-tile groups; split-K over 2 tiles, and
    # over 5 tiles in 4 slices (one empty; 3 bits: a padded narrow span)
    for out_f, in_f, group in ((390, 512, 64), (384, 1280, 128), (200, 2048, 32), (256, 512, 256)):
        layer = _random_layer(bits, out_f=out_f, in_f=in_f, group=group, device="cuda")
        fast = PlanesLinear(layer)
        assert fast.tile == cuda_mma.TILE
        x = torch.randn(rows, in_f, dtype=torch.bfloat16, device="cuda")
        ref = x.float() @ layer.weight_float().t()
        args = (x, fast.planes(), fast.scale, fast.zero, bits, group, fast.tile, out_f, (fast.split_partial, fast.split_count))
        y = cuda_mma.mma(*args, source=source)
        assert y is not None and y.dtype == torch.bfloat16 and _rel(y, ref) < 1e-2, (out_f, in_f, group)
        assert torch.equal(cuda_mma.mma(*args, source=source), y)  # slices added in a fixed order
        assert int(fast.split_count.abs().sum()) == 0  # the counters are back at zero
        assert _rel(fast(x), ref + layer.bias.float()) < 1e-2


@cuda
@pytest.mark.parametrize("bits", SERVED)
@pytest.mark.parametrize("rows", [1, 7, 100])
def test_stacked_siblings_match_their_own_layers_on_cuda(bits, rows):
    """The stacked product (GEMV, tile kernel, dequantize + cuBLAS by rows) sliced per member is each
    member's own product."""
    layers = [PlanesLinear(_random_layer(bits, out_f=n, in_f=512, group=128, device="cuda")) for n in (384, 128, 128)]
    group = SiblingGroup(stack(layers), [m.out_features for m in layers])
    x = torch.randn(rows, 512, dtype=torch.bfloat16, device="cuda")
    for i, layer in enumerate(layers):
        assert _rel(SiblingLinear(group, i)(x), layer(x)) < 1e-3


@cuda
def test_tinygemm_matches_packed_linear_on_cuda():
    layer = _random_layer(4, out_f=384, in_f=512, group=128, device="cuda")
    x = torch.randn(3, 512, dtype=torch.bfloat16, device="cuda")
    assert _rel(TinyGemmLinear(layer)(x), layer(x)) < 1e-2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gets")
def test_bench_gemv_without_a_gpu_says_so_and_exits_2():
    proc = run_script("bench_gemv.py", ["--widths", "3", "--all-shapes", "--json", "/nonexistent/never-written.json"], timeout=300)
    assert proc.returncode == 2 and "bench_gemv needs a CUDA GPU" in proc.stderr, proc.stderr[-2000:]
    proc = run_script("bench_gemv.py", ["--variant", "/nonexistent/andor.cu"], timeout=300)
    assert proc.returncode == 2 and "--variant: no such .cu file: /nonexistent/andor.cu" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gets")
def test_bench_tile_kernel_refuses_bad_settings_and_says_when_there_is_no_gpu():
    proc = run_script("bench_tile_kernel.py", ["--splits", "0"], timeout=300)
    assert proc.returncode == 2 and "--splits" in proc.stderr, proc.stderr[-2000:]
    proc = run_script("bench_tile_kernel.py", ["--variant", "/nonexistent/ring.cu"], timeout=300)
    assert proc.returncode == 2 and "--variant: no such .cu file: /nonexistent/ring.cu" in proc.stderr, proc.stderr[-2000:]
    proc = run_script("bench_tile_kernel.py", ["--rows", "16", "--json", "/nonexistent/never-written.json"], timeout=300)
    assert proc.returncode == 2 and "bench_tile_kernel needs a CUDA GPU" in proc.stderr, proc.stderr[-2000:]


_SASS = """
        Function : _ZN46_GLOBAL__N__mma_planes_cu17mma_planes_kernelILi2ELi1ELi2ELi2EEEvPK13__nv_bfloat16PKiS5_
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
        /*0020*/                   LOP3.LUT R2, R0, 0x70007, RZ, 0xc0, !PT ;
        /*0030*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0040*/              @!P0 SHF.R.U32.HI R2, RZ, 0x3, R2 ;
        /*0050*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0060*/               @P1 BRA 0x90 ;
        /*0070*/              @!P2 BRA 0x20 ;
        /*0080*/                   EXIT ;
        Function : _ZN46_GLOBAL__N__mma_planes_cu9other_kernelEv
        /*0000*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0010*/                   BRA 0x0 ;
"""


def test_count_tile_instructions_counts_the_loop_that_holds_the_mma(monkeypatch):
    """The loop is found from its backward branch around the mma instructions (a forward branch inside
    it does not end it); other kernels are left out."""
    script = load_script("count_tile_instructions.py", monkeypatch)
    assert script.loop_counts(_SASS) == {(2, 1, 2, 2): 6}  # 0x20 .. 0x70


def test_count_tile_instructions_refuses_bad_settings_and_missing_tools(monkeypatch, capsys):
    script = load_script("count_tile_instructions.py", monkeypatch)
    for argv, what in ((["--source", "/nonexistent/ring.cu"], "--source: no such file"), (["--arch", "9.0"], "--arch: '9.0'")):
        with pytest.raises(SystemExit) as stop:
            script.main(argv)
        assert stop.value.code == 2 and what in capsys.readouterr().err
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    assert script.main([]) == 2 and "needs nvcc" in capsys.readouterr().err


def test_count_tile_instructions_on_the_shipped_kernel(monkeypatch, capsys, tmp_path):
    """Where nvcc and cuobjdump are installed (not in CI): every instance of the shipped kernel has its
    loop counted, and a 9-16-row tile (two activation slices) issues more than a 2-8-row one."""
    script = load_script("count_tile_instructions.py", monkeypatch)
    if not shutil.which("nvcc") or script.find_cuobjdump(None) is None:
        pytest.skip("needs nvcc and cuobjdump (the CUDA toolkit, or the nvidia-cuda-cuobjdump wheel)")
    from amq.runtime import cuda_mma

    assert script.main(["--source", str(cuda_mma.SOURCE), "--json", str(tmp_path / "c.json")]) == 0
    counts = json.loads((tmp_path / "c.json").read_text())["loop_instructions"]["shipped"]
    assert len(counts) == len(cuda_mma.WIDTHS) * 4 * 2  # widths x (groups of 32/64/128, whole tiles) x row slices
    for key, n in counts.items():
        assert script.WEIGHTS_PER_LANE <= n <= 16 * script.WEIGHTS_PER_LANE, key
        if key.endswith("mt2"):
            assert n > counts[key.replace("mt2", "mt1")], key
    assert "| bits | group | rows |" in capsys.readouterr().out
