#!/usr/bin/env python
"""Serving speed of amq's fast runtime (amq.runtime) on one GPU: kernels, then a 7B-shaped model.

One command builds, checks and times everything (docs/benchmarks.md, "Serving speed on one H200"):

1. Per-layer products (the three Llama-2-7B linear shapes; 1, 16 and 2048 rows): bf16 cuBLAS,
   amq's bit-plane Triton kernels at 2/3/4/8 bits, torch's int4 tinygemm, torch.compile'd
   dequantize-and-matmul of amq's bit stream, and GemLite where it is installed. Each candidate is
   first checked against the float32 product with amq's dequantized weight, then timed as the replay
   of one CUDA graph over enough distinct layers that the weights do not sit in L2.
2. A Llama-2-7B-shaped model (hidden 4096, 32 layers, 32 heads, intermediate 11008, vocabulary
   32,000) with random bf16 weights made on the GPU. Its 224 decoder linears are quantized by
   round-to-nearest at group 128 once per width; a configuration swaps the converted layers in.
   Configurations: bf16, uniform 4-bit (each 4-bit kernel), and mixed allocations at 2.5 / 3 / 3.5 /
   4 average bits over {2, 3, 4, 8} (greedy allocation from a deterministic per-layer score: there
   is no searched 7B front here; `--share-siblings` gives each q/k/v and gate/up set one width, as
   `search=amq_fused` does). Sibling sets of one width are stacked into one layer as `convert` does
   (`--stack on off` also times them apart). Measured: decode tokens/s at batch 1 and 16 (HF StaticCache, one
   decode step captured as a CUDA graph, greedy next token inside the graph), prefill tokens/s over
   2048 tokens (last-token logits; eager and as a CUDA graph replay; timed first), weight bytes and peak GPU memory.

`--micro-tiles 512` also times the planes layout with tiles of 512 beside the default 256 (2- and
3-bit layers then have runs of 32 codes, as 4 bits has at 256; the kernels take the tile as a
parameter, their launch shapes are tuned for 256).

Prints a table last and writes JSON to --json (default $OUT/bench_serving.json).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amq.quantizers.grid import rtn_quant  # noqa: E402
from amq.quantizers.packed import PackedLinear, dequantize_packed  # noqa: E402
from amq.runtime import PlanesLinear, TinyGemmLinear, cuda_mma  # noqa: E402
from amq.runtime.fuse import SIBLINGS, SiblingGroup, fuse_siblings  # noqa: E402
from amq.runtime.layout import split_workspace, tile_size  # noqa: E402

log = logging.getLogger("bench_serving")

SHAPES = {"gate/up": (11008, 4096), "down": (4096, 11008), "q/k/v/o": (4096, 4096)}  # (out, in)
WIDTHS = (2, 3, 4, 8)
ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------------------- timing
def graph_time(fn: Callable[[], Any], reps: int = 20, warmup: int = 3) -> float:
    """Seconds per call of `fn` replayed from a CUDA graph (median of `reps` replays)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del g
    return sorted(times)[len(times) // 2]


def event_time(fn: Callable[[], Any], reps: int = 5) -> float:
    """Seconds per eager call (median of `reps`, after one warm-up)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def machine() -> dict[str, str]:
    info = {"torch": torch.__version__, "python": sys.version.split()[0]}
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
        info["gpu"] = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    try:
        import transformers
        import triton

        info["triton"], info["transformers"] = triton.__version__, transformers.__version__
    except ImportError:
        pass
    return info


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative norm error of a product against the float32 reference."""
    return float((y.float() - ref).norm() / ref.norm())


# ------------------------------------------------------------------------------------ layers
def packed_layer(out_f: int, in_f: int, bits: int, group: int, gen: torch.Generator) -> PackedLinear:
    """A PackedLinear of random codes with fractional zero points (HQQ-like), on the GPU."""
    from amq.quantizers.packed import GroupQuant

    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=gen, device="cuda", dtype=torch.uint8)
    groups = (out_f, in_f // group)
    scale = (torch.rand(groups, generator=gen, device="cuda") * 0.01 + 1e-3).half()
    zero = (torch.rand(groups, generator=gen, device="cuda") * (2**bits - 1)).half()
    return PackedLinear.from_quant(GroupQuant(codes, scale, zero, bits, group), None, torch.bfloat16)


def layer_bytes(m: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])


def candidates(bits: int, layer: PackedLinear, tiles: Sequence[int] = ()) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Callables x -> y for every kernel that holds this width; `tiles`: the planes layout again at
    each of these largest tiles where it gives the layer another tile than the default's."""
    planes = PlanesLinear(layer)
    out: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"planes": planes}
    if bits in cuda_mma.WIDTHS:  # the same layer on the Triton tile kernel at 2-16 rows (the CUDA one's alternative)
        out["planes, Triton tiles"] = lambda x: triton_tiles(planes, x)
    default = tile_size(layer.in_features, bits, layer.group_size)
    for tile in sorted({tile_size(layer.in_features, bits, layer.group_size, t) for t in tiles} - {default, None}):
        out[f"planes, tile {tile}"] = PlanesLinear(layer, max_tile=tile)  # packed once, only where the tile differs
    if bits == 4:
        out["tinygemm"] = TinyGemmLinear(layer)
    return out


def triton_tiles(layer: PlanesLinear, x: torch.Tensor) -> torch.Tensor:
    """The layer's product with the CUDA tile kernel off: Triton's at 2-16 rows, the layer's own path otherwise."""
    if not 2 <= x.shape[0] <= layer.gemm_max_rows:
        return layer(x)
    from amq.runtime import triton_kernels as tk

    geometry = (layer.bits, layer.group_size, layer.tile, layer.out_features)
    return tk.product(x, layer.planes(), layer.scale, layer.zero, *geometry, (layer.split_partial, layer.split_count), cuda_mma=False)


def compiled_dequant_matmul() -> Callable[[torch.Tensor, PackedLinear], torch.Tensor]:
    """amq's bit-stream dequantization and the matmul through torch.compile (tensors as arguments,
    so one compiled graph serves every layer of a shape)."""

    def f(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int, out_f: int, in_f: int) -> torch.Tensor:
        return F.linear(x, dequantize_packed(qweight, scale, zero, None, bits, group, out_f, in_f).to(x.dtype))

    cf = torch.compile(f, dynamic=False)
    return lambda x, m: cf(x, m.qweight, m.scale, m.zero, m.bits, m.group_size, m.out_features, m.in_features)


def gemlite_layer(layer: PackedLinear) -> Callable[[torch.Tensor], torch.Tensor] | None:
    try:
        from gemlite.helper import A16Wn
    except ImportError:
        return None
    q = layer.to_quant()
    return A16Wn(device="cuda", dtype=torch.bfloat16).from_weights(q.codes, q.scale.bfloat16(), q.zero.bfloat16(), q.bits, q.group_size)


def micro(args: argparse.Namespace, deadline: float) -> list[dict[str, Any]]:
    """Per-layer products: check each candidate, then time it over distinct layers (L2 cold)."""
    rows: list[dict[str, Any]] = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    compiled = compiled_dequant_matmul() if args.compile_candidates else None
    for shape_name, (out_f, in_f) in SHAPES.items():
        if shape_name not in args.micro_shapes:
            continue
        n_bf16 = max(2, math.ceil(args.cold_bytes / (out_f * in_f * 2)))
        dense = [torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02 for _ in range(n_bf16)]
        for m_rows in args.micro_rows:
            xs = torch.randn(m_rows, in_f, device="cuda", dtype=torch.bfloat16, generator=gen)
            t = graph_time(lambda: [F.linear(xs, w) for w in dense]) / n_bf16
            rows.append({"shape": shape_name, "rows": m_rows, "bits": 16, "kernel": "bf16 cuBLAS", "us": t * 1e6, "rel_err": 0.0})
        dense.clear()
        for bits in args.micro_widths:
            n = max(2, math.ceil(args.cold_bytes / (out_f * in_f * bits / 8)))
            layers = [packed_layer(out_f, in_f, bits, args.group_size, gen) for _ in range(n)]
            fast = [candidates(bits, m, args.micro_tiles) for m in layers]
            ref_w = layers[0].weight_float()
            for m_rows in args.micro_rows:
                x = torch.randn(m_rows, in_f, device="cuda", dtype=torch.bfloat16, generator=gen)
                ref = x.float() @ ref_w.t()
                for name in fast[0]:
                    err = rel_err(fast[0][name](x), ref)
                    t = graph_time(lambda: [c[name](x) for c in fast]) / n
                    rows.append({"shape": shape_name, "rows": m_rows, "bits": bits, "kernel": name, "us": t * 1e6, "rel_err": err})
                    log.info("%s rows=%d %d-bit %s: %.1f us (err %.1e)", shape_name, m_rows, bits, name, t * 1e6, err)
                if compiled is not None and m_rows == 1 and shape_name == "gate/up" and time.monotonic() < deadline:
                    try:
                        err = rel_err(compiled(x, layers[0]), ref)
                        t = graph_time(lambda: [compiled(x, m) for m in layers]) / n
                        rows.append({"shape": shape_name, "rows": m_rows, "bits": bits, "kernel": "compile dequant+mm", "us": t * 1e6, "rel_err": err})
                    except Exception as e:  # a candidate that fails is reported, not fatal
                        log.warning("compiled candidate %d-bit failed: %s", bits, e)
                if args.gemlite and bits in (2, 4, 8) and shape_name == "gate/up" and m_rows <= 16 and time.monotonic() < deadline:
                    try:
                        gl = [gemlite_layer(m) for m in layers[: min(n, 8)]]
                        if gl[0] is not None:
                            err = rel_err(gl[0](x), ref)
                            t = graph_time(lambda: [g(x) for g in gl]) / len(gl)
                            rows.append({"shape": shape_name, "rows": m_rows, "bits": bits, "kernel": "gemlite", "us": t * 1e6, "rel_err": err})
                    except Exception as e:
                        log.warning("gemlite %d-bit failed: %s", bits, e)
            layers.clear()
            fast.clear()
            torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------ the 7B model
def build_model(args: argparse.Namespace) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        intermediate_size=args.intermediate,
        vocab_size=args.vocab,
        max_position_embeddings=4096,
        torch_dtype=torch.bfloat16,
    )
    cfg._attn_implementation = "sdpa"
    with torch.device("cuda"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    return model.eval()


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in ROLES]


def layer_score(name: str) -> float:
    """A deterministic stand-in for measured sensitivity: v/down and the first and last blocks
    matter more (as they do in real Llama sensitivity tables), plus a smooth per-block wobble."""
    block = int(name.split(".")[2])
    role = name.rsplit(".", 1)[-1]
    role_w = {"v_proj": 3.0, "down_proj": 2.5, "o_proj": 1.5, "q_proj": 1.0, "k_proj": 1.0, "gate_proj": 1.2, "up_proj": 1.2}[role]
    edge = 4.0 if block in (0, 1) else (2.0 if block >= 30 else 1.0)
    return role_w * edge * (1.0 + 0.3 * math.sin(1.7 * block + len(role)))


def allocate(numel: dict[str, int], target: float, widths: tuple[int, ...] = WIDTHS, share: bool = False) -> dict[str, int]:
    """Greedy allocation to `target` average bits (weights only, by numel): start all at the lowest
    width; repeatedly move up the unit whose noise (score * 4**-bits) falls most per added bit. A
    unit is one linear, or with `share` one sibling set of a block (q/k/v, gate/up: one width, as
    `search=amq_fused` gives them), whose score is its members' total."""
    units: dict[str, list[str]] = {}
    for n in numel:
        role = n.rsplit(".", 1)[-1]
        sibling = next((s for s in SIBLINGS if role in s), None) if share else None
        units.setdefault(n.rsplit(".", 1)[0] + "." + "+".join(sibling) if sibling else n, []).append(n)
    size = {u: sum(numel[n] for n in ns) for u, ns in units.items()}
    score = {u: sum(layer_score(n) for n in ns) for u, ns in units.items()}
    bits = {u: widths[0] for u in units}
    budget = target * sum(numel.values()) - sum(size[u] * bits[u] for u in units)

    def gain(u: str) -> tuple[float, int] | None:
        i = widths.index(bits[u])
        if i + 1 == len(widths):
            return None
        up = widths[i + 1]
        return score[u] * (4.0 ** -bits[u] - 4.0**-up) / (up - bits[u]), up

    while True:
        best = None
        for u in units:
            g = gain(u)
            if g is not None and size[u] * (g[1] - bits[u]) <= budget + 1e-6 and (best is None or g[0] > best[1]):
                best = (u, g[0], g[1])
        if best is None:
            return {n: bits[u] for u, ns in units.items() for n in ns}
        budget -= size[best[0]] * (best[2] - bits[best[0]])
        bits[best[0]] = best[2]


def set_layers(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Swap `modules` in by name; the stacked sibling layers of the previous configuration go."""
    for parent in list(model.modules()):
        for child in [n for n, m in parent.named_children() if isinstance(m, SiblingGroup)]:
            delattr(parent, child)
    for name, m in modules.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, m)


def model_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def decode_speed(model: nn.Module, batch: int, steps: int, prompt: int, compiled: bool = False) -> tuple[float, str]:
    """Tokens/s of greedy decoding with a static KV cache, one step replayed from a CUDA graph.

    With `compiled`, the step's forward goes through torch.compile first (as a serving engine
    fuses the norms, rotary embeddings and cache updates between the products), then the whole
    step, compiled code included, is captured in the graph. A compile failure is logged and the
    step is timed eagerly captured instead (the mode says which)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=prompt + steps + 8)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device="cuda")
    fwd: Callable[..., Any] = model
    label = "cuda graph"
    if compiled:
        torch._dynamo.reset()
        fwd, label = torch.compile(model, dynamic=False), "compiled + cuda graph"
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(prompt, device="cuda"), logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        cpos = torch.tensor([prompt], device="cuda")
        pos = cpos.view(1, 1).expand(batch, 1).clone()

        def step() -> None:
            logits = fwd(input_ids=tok, past_key_values=cache, use_cache=True, cache_position=cpos, position_ids=pos, logits_to_keep=1).logits
            tok.copy_(logits[:, -1].argmax(-1, keepdim=True))
            cpos.add_(1)
            pos.add_(1)

        if compiled:
            t0 = time.monotonic()
            try:
                step()
                torch.cuda.synchronize()
                log.info("decode step compiled in %.1f s (batch %d)", time.monotonic() - t0, batch)
            except Exception as e:  # time the uncompiled step rather than nothing
                log.warning("torch.compile of the decode step failed (%s); timing it uncompiled", e)
                fwd, label = model, "cuda graph (compile failed)"
        mode = label
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    step()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                step()
            run = g.replay
        except Exception as e:  # report eager speed rather than nothing
            log.warning("CUDA graph capture of the decode step failed (%s); timing eager steps", e)
            torch.cuda.synchronize()
            mode, run = "eager", step
        cpos.fill_(prompt)
        pos.fill_(prompt)
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        n = steps - 3
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(n):
            run()
        b.record()
        b.synchronize()
    return batch * n / (a.elapsed_time(b) / 1e3), mode


def prefill_speed(model: nn.Module, tokens: int) -> tuple[float, float]:
    """Tokens/s of one forward over `tokens` tokens: (eager, replayed from a CUDA graph).

    Eager, a 7B forward of 2048 tokens is close to bound by the host's kernel launches (about
    50 ms of CPU against 55-60 ms of GPU work, more with the quantized layers' Triton launches),
    so any load on the host shows; the graph replay measures the GPU work alone, as an engine
    that captures its prefill (or overlaps launches) sees it. NaN where capture fails."""
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device="cuda")
    fwd = lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1)  # noqa: E731
    with torch.no_grad():
        eager = event_time(fwd, reps=9)
        try:
            graph = graph_time(fwd, reps=9)
        except Exception as e:  # report the eager number rather than nothing
            log.warning("CUDA graph capture of the prefill failed (%s)", e)
            graph = math.nan
    return tokens / eager, tokens / graph


def e2e(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    t0 = time.monotonic()
    model = build_model(args)
    names = linear_names(model)
    dense = {n: model.get_submodule(n) for n in names}
    numel = {n: m.weight.numel() for n, m in dense.items()}
    non_linear = model_bytes(model) - sum(layer_bytes(m) for m in dense.values())
    fast: dict[tuple[str, int, str], nn.Module] = {}
    workspace = split_workspace(max(m.out_features for m in dense.values()), torch.device("cuda"))  # shared, as convert does
    widths = tuple(sorted(set(args.widths)))
    quantized = sorted({*widths, 4})  # uniform 4-bit is every call's comparison
    for n, lin in dense.items():
        for b in quantized:
            q = rtn_quant(lin.weight.detach(), b, args.group_size)
            packed = PackedLinear.from_quant(q, None, torch.bfloat16)
            fast[(n, b, "planes")] = PlanesLinear(packed, workspace=workspace)
            if b == 4:
                fast[(n, b, "tinygemm")] = TinyGemmLinear(packed)
            del packed, q
    torch.cuda.synchronize()
    log.info("quantized %d linears x %d widths in %.1f s", len(names), len(quantized), time.monotonic() - t0)
    info = {"linears": len(names), "linear_params": sum(numel.values()), "non_linear_bytes": non_linear, "widths": list(widths)}

    stacking = [v == "on" for v in args.stack]
    configs: list[tuple[str, dict[str, int] | None, str, bool]] = [("bf16", None, "planes", False)] if args.bf16 else []
    configs += [("uniform 4", {n: 4 for n in names}, four, stacked) for four in args.four_bit for stacked in stacking]
    for target in args.targets:
        alloc = allocate(numel, target, widths, share=args.share_siblings)
        label = f"mixed {target:g}" if widths == WIDTHS else f"mixed {target:g} of {{{','.join(map(str, widths))}}}"
        configs += [(label, alloc, four, stacked) for four in args.mixed_four_bit for stacked in stacking]
    rows = []
    for label, alloc, four, stacked in configs:
        if alloc is None:
            set_layers(model, dense)
            kernels = "cuBLAS bf16"
            expected = model_bytes(model)
        else:
            set_layers(model, {n: fast[(n, b, four if b == 4 else "planes")] for n, b in alloc.items()})
            kernels = "planes" if four == "planes" else "planes + tinygemm (4-bit)"
            if stacked:
                kernels += f", {len(fuse_siblings(model))} stacked"
            expected = non_linear + sum(numel[n] * (b + 32 / args.group_size) / 8 for n, b in alloc.items())
        weights = model_bytes(model)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
        row: dict[str, Any] = {"config": label, "kernels": kernels, "weight_bytes": weights, "expected_bytes": expected}
        if alloc is not None:
            row["avg_bits"] = sum(numel[n] * b for n, b in alloc.items()) / sum(numel.values())
            row["widths"] = {str(b): sum(v == b for v in alloc.values()) for b in WIDTHS}
        try:
            # prefill first, before this configuration's decode compile loads the host (`prefill_speed`)
            row["prefill_eager"], row["prefill"] = prefill_speed(model, args.prefill)
            if args.decode:
                row["decode_b1"], row["decode_mode"] = decode_speed(model, 1, args.steps, args.prompt, args.compile_decode)
                row["decode_b16"], _ = decode_speed(model, 16, args.steps, args.prompt, args.compile_decode)
            else:
                row["decode_b1"] = row["decode_b16"] = math.nan
        except Exception as e:
            log.exception("config %s failed", label)
            row["error"] = repr(e)
        row["peak_bytes"] = weights + torch.cuda.max_memory_allocated() - base_alloc  # this config's weights + its transient memory
        rows.append(row)
        log.info("%s", json.dumps(row))
        torch.cuda.empty_cache()
    set_layers(model, dense)
    return rows, info


# ------------------------------------------------------------------------------------- report
SPEEDS = {"decode_b1": ".1f", "decode_b16": ".0f", "prefill": ".0f", "prefill_eager": ".0f"}  # tokens/s columns, their format


def _num(v: float, fmt: str, unit: str = "") -> str:
    """A table cell: '-' for what was not measured (NaN: --no-decode, --no-bf16, a failed capture)."""
    return "-" if math.isnan(v) else f"{v:{fmt}}{unit}"


def report(micro_rows: list[dict[str, Any]], e2e_rows: list[dict[str, Any]]) -> str:
    lines = []
    if micro_rows:
        lines += [
            "",
            "per-layer products (us per product, CUDA graph, L2 cold)",
            "| shape | rows | bits | kernel | us | vs bf16 | rel err |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        base = {(r["shape"], r["rows"]): r["us"] for r in micro_rows if r["bits"] == 16}
        for r in micro_rows:
            lines.append(
                f"| {r['shape']} | {r['rows']} | {r['bits']} | {r['kernel']} | {r['us']:.1f} | {base[(r['shape'], r['rows'])] / r['us']:.2f}x | {r['rel_err']:.1e} |"
            )
    if e2e_rows:
        ref = next((r for r in e2e_rows if r["config"] == "bf16"), dict.fromkeys(SPEEDS, math.nan))  # --no-bf16: no ratios
        lines += [
            "",
            "Llama-2-7B shape, random weights (tokens/s; memory GiB)",
            "| config | kernels | avg bits | widths 2/3/4/8 | decode b1 | vs bf16 | decode b16 | vs bf16 | prefill 2048 (graph) | vs bf16 | eager | vs bf16 | weights GiB | bits say GiB | peak GiB |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        gib = 2**30
        for r in e2e_rows:
            if "error" in r:
                lines.append(f"| {r['config']} | {r['kernels']} | error: {r['error'][:80]} |")
                continue
            w = r.get("widths")
            ws = "/".join(w[str(b)].__str__() for b in WIDTHS) if w else "-"
            cells = [f"{_num(r[key], fmt)} | {_num(r[key] / ref[key], '.2f', 'x')}" for key, fmt in SPEEDS.items()]
            lines.append(
                f"| {r['config']} | {r['kernels']} | {r.get('avg_bits', 16):.2f} | {ws} | {' | '.join(cells)} | "
                f"{r['weight_bytes'] / gib:.2f} | {r['expected_bytes'] / gib:.2f} | {r['peak_bytes'] / gib:.2f} |"
            )
        lines += against_uniform_four(e2e_rows)
    return "\n".join(lines)


def against_uniform_four(e2e_rows: list[dict[str, Any]]) -> list[str]:
    """Each mixed point's speeds as a ratio of the call's first uniform 4-bit row (the target: no
    point of a front slower than uniform 4-bit); nothing without such a row."""
    four = next((r for r in e2e_rows if r["config"] == "uniform 4" and "error" not in r), None)
    mixed = [r for r in e2e_rows if r["config"].startswith("mixed") and "error" not in r]
    if four is None or not mixed:
        return []
    lines = [
        "",
        f"mixed points against uniform 4-bit ({four['kernels']})",
        "| config | kernels | decode b1 | decode b16 | prefill 2048 (graph) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in mixed:
        cells = [_num(r[key] / four[key], ".3f", "x") for key in ("decode_b1", "decode_b16", "prefill")]
        lines.append(f"| {r['config']} | {r['kernels']} | {' | '.join(cells)} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "bench_serving.json"))
    p.add_argument("--skip-micro", action="store_true")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--micro-shapes", nargs="+", default=list(SHAPES))
    p.add_argument("--micro-rows", nargs="+", type=int, default=[1, 16, 2048])
    p.add_argument("--micro-widths", nargs="+", type=int, default=list(WIDTHS), choices=WIDTHS)
    p.add_argument(
        "--micro-tiles",
        nargs="+",
        type=int,
        default=[],
        metavar="T",
        help="also time the planes layout with tiles up to T (a power of two, 32-1024; the kernels are tuned for 256) beside the default",
    )
    p.add_argument("--cold-bytes", type=float, default=256e6, help="weight bytes each timed graph walks (> L2)")
    p.add_argument("--compile-candidates", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--gemlite", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--decode", action=argparse.BooleanOptionalAction, default=True, help="time decoding (--no-decode: prefill and memory only)")
    p.add_argument("--compile-decode", action=argparse.BooleanOptionalAction, default=True, help="torch.compile the decode step before capturing it")
    p.add_argument(
        "--four-bit", nargs="*", choices=["planes", "tinygemm"], default=["planes", "tinygemm"], help="kernels tried for uniform 4-bit (none: skip it)"
    )
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="time the bf16 model (the ratios' baseline)")
    p.add_argument(
        "--mixed-four-bit", nargs="+", choices=["planes", "tinygemm"], default=["planes"], help="kernels tried for the 4-bit layers of mixed configurations"
    )
    p.add_argument(
        "--stack",
        nargs="+",
        choices=["on", "off"],
        default=["on"],
        help="stack q/k/v and gate/up of one width into one layer (amq.runtime.fuse); 'on off' times both",
    )
    p.add_argument(
        "--share-siblings",
        action="store_true",
        help="mixed allocations give each block's q/k/v and gate/up one width (as search=amq_fused does), so every set stacks",
    )
    p.add_argument("--widths", nargs="+", type=int, default=list(WIDTHS), choices=WIDTHS, help="widths the mixed allocations use (e.g. 2 4 8: no 3-bit layers)")
    p.add_argument("--micro-seconds", type=float, default=200, help="stop adding optional candidates after this")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--targets", nargs="+", type=float, default=[2.5, 3.0, 3.5, 4.0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--steps", type=int, default=64, help="decode steps timed (after 3 warm-ups)")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--prefill", type=int, default=2048)
    args = p.parse_args(argv)
    bad = [t for t in args.micro_tiles if not 32 <= t <= 1024 or t & (t - 1)]
    if bad:
        p.error(f"--micro-tiles: {bad[0]} (valid: a power of two from 32 to 1024)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not torch.cuda.is_available():
        log.error("needs a CUDA GPU")
        return 2
    result: dict[str, Any] = {"machine": machine(), "args": vars(args)}
    log.info("machine: %s", result["machine"])
    t0 = time.monotonic()
    micro_rows = [] if args.skip_micro else micro(args, t0 + args.micro_seconds)
    result["micro"] = micro_rows
    result["micro_seconds"] = time.monotonic() - t0
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    e2e_rows, info = ([], {}) if args.skip_e2e else e2e(args)
    result.update(e2e=e2e_rows, model=info, seconds=time.monotonic() - t0)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"machine: {result['machine']}")
    print(report(micro_rows, e2e_rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
