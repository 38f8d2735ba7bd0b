"""Write a quantized model as a compressed-tensors checkpoint that plain transformers loads.

An amq model directory (`amq-packed`, see `export.py`) opens only through `amq.load_quantized`.
This writes the same weights in the `compressed-tensors` format (the package of that name), so
that `transformers.AutoModelForCausalLM.from_pretrained(dir)` rebuilds the model without amq.
Tested with compressed-tensors 0.17.1, transformers 5.23, torch 2.13. compressed-tensors 0.18 to
0.20.1 cannot load asymmetric `pack-quantized` layers in transformers 5.23 (on the meta device
they leave the zero point unpacked, so the checkpoint's packed one mismatches), their own
checkpoints included; they also pack 3/5/6/7-bit codes densely (32/b a word, 0.17: 32//b).

What maps to what, per `PackedLinear` of b bits (codes q in [0, 2^b - 1], w = (q - zero) * scale
per group of `group_size` input features; compressed-tensors stores codes and zero points
shifted by 2^(b-1) into signed int8 and computes (q_s - zero_s) * scale, the same value):

  every zero point of the layer an integer in [0, 2^b - 1]  ->  format `pack-quantized`:
      weight_packed (int32, codes bit-packed along the input features), weight_scale (float16),
      weight_zero_point (int32, packed along the output features), weight_shape;
      exact. The only layout vLLM's WNA16 kernels read (asymmetric: 4-bit, and 8-bit on Hopper; `vllm_kernel`).
  otherwise (amq's quantizers all give float16 zero points: the min-max grid's -lo/scale and
  HQQ's optimised zeros are not integers)  ->  format `naive-quantized`:
      weight (int8 codes, one byte per weight), weight_scale (float16),
      weight_zero_point (float32, declared by `zp_dtype`); exact, but 8 bits per weight on disk.
      pack-quantized cannot hold these: it packs zero points as b-bit integers.
      `zero_points="round"` instead rounds them to the nearest integer, which packs the layer
      (b bits per weight) but moves every weight of a group by up to half a step: far from exact.

One config group per (width, format), targeting its modules by full name; everything that is
not a PackedLinear (embeddings, norms, lm_head, biases) is stored as it is. AWQ's per-input-channel
`input_scale` has no compressed-tensors form, so it is folded into the module that produces the
layer's input (`amq.quantizers.folding`): the norm's weight for q/k/v and gate/up, up_proj's group
scales for down_proj (AWQ makes the latter fold itself, and the finalize stage saves models with
the rest folded, `stage.in_shipped_form`; amq directories from before still hold input scales).
Layers whose scale cannot move there (no such producer, or readers of one norm with different
scales: AWQ with `fold=false`) are refused.

On load, compressed-tensors casts the scale and zero point to the model dtype and dequantizes in it,
where amq dequantizes in float32 and rounds the weight once. amq's quantizers hold their grids
exactly in the dtype the model computes in (`grid.held_scale`, `grid.held_zero`: in bfloat16,
scales of 8 significant bits, zero points on a grid of 2^(bits - 8)), so both get the same weights,
bit for bit (in bfloat16 too: 8-bit zero points are then whole steps, and those layers pack).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from torch import nn

from amq.errors import ConfigError, InvalidArgument
from amq.io import replace_dir
from amq.modeling.normalize import needs_linear_layers
from amq.quantizers.export import load_quantized, packed_modules
from amq.quantizers.folding import FACTOR_TOLERANCE, factor_error, find_producers, folded_norm, norm_probe, rows_divided, shared_scale
from amq.quantizers.packed import GroupQuant, PackedLinear

log = logging.getLogger(__name__)

ZeroPoints = Literal["exact", "round"]
WEIGHTS_FILE = "model.safetensors"
PACKED, NAIVE = "pack-quantized", "naive-quantized"
# Files of an amq model directory that a compressed-tensors directory keeps as they are.
COPIED_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "chat_template*", "generation_config.json")


def layer_tensors(name: str, q: GroupQuant, bias: torch.Tensor | None, zero_points: ZeroPoints = "exact") -> tuple[str, dict[str, torch.Tensor]]:
    """(format, tensors by full name) of one quantized layer (input scale already folded away)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    assert q.input_scale is None, f"{name}: fold its input scale first (fold_input_scales)"
    offset = 1 << (q.bits - 1)  # compressed-tensors stores codes and zero points signed
    codes = (q.codes.to(torch.int16) - offset).to(torch.int8)
    zero = q.zero.float().round() if zero_points == "round" else q.zero.float()
    packable = bool(torch.equal(zero, zero.round()) and zero.min() >= 0 and zero.max() <= 2**q.bits - 1)
    out = {f"{name}.weight_scale": q.scale.half().contiguous()}
    if bias is not None:
        out[f"{name}.bias"] = bias.detach().contiguous()
    if packable:
        out[f"{name}.weight_packed"] = pack_to_int32(codes, q.bits).contiguous()
        out[f"{name}.weight_zero_point"] = pack_to_int32((zero - offset).to(torch.int8), q.bits, packed_dim=0).contiguous()
        out[f"{name}.weight_shape"] = torch.tensor(list(q.shape), dtype=torch.int64)
        return PACKED, out
    out[f"{name}.weight"] = codes.contiguous()
    out[f"{name}.weight_zero_point"] = (zero - offset).contiguous()  # float32: exact for float16 zeros
    return NAIVE, out


def fold_input_scales(model: nn.Module, layers: dict[str, PackedLinear]) -> tuple[dict[str, GroupQuant], dict[str, torch.Tensor]]:
    """Every layer's GroupQuant with AWQ input scales moved into their producers, and the other
    tensors of the model that change (norm weights, unquantized producer linears) by name.

    Why: compressed-tensors computes `dequant @ x`; a layer that computes `dequant @ (x / s)` is the
    same function when its producer already outputs x / s. Refuses what cannot move (see module doc).
    """
    quants = {n: m.to_quant() for n, m in layers.items()}
    overrides: dict[str, torch.Tensor] = {n + ".bias": m.bias for n, m in layers.items() if m.bias is not None}
    scaled = [n for n, q in quants.items() if q.input_scale is not None]
    if not scaled:
        return quants, overrides
    producers = find_producers(model, scaled)
    missing = [n for n in scaled if n not in producers]
    if missing:
        raise InvalidArgument(
            "model",
            f"{missing[0]} has an AWQ input scale that no module before it can absorb, so compressed-tensors cannot express it",
            "a model finalized with HQQ, GPTQ, or AWQ with fold=true (the default)",
        )
    readers: dict[str, list[str]] = {}
    for n in scaled:
        readers.setdefault(producers[n].name, []).append(n)
    dtype = next(model.parameters()).dtype  # what the model computes in
    for producer, names in readers.items():
        s = shared_scale({n: quants[n].input_scale for n in names})
        if s is None:
            raise InvalidArgument(
                "model",
                f"{', '.join(names)} read {producer} with different AWQ input scales, which one module cannot absorb",
                "a model finalized with HQQ, GPTQ, or AWQ with fold=true (the default)",
            )
        s = s.float()
        module = model.get_submodule(producer)
        if producers[names[0]].kind == "norm":
            try:
                folded, form = folded_norm(module, s, norm_probe(module))
            except ValueError as exc:
                raise InvalidArgument(
                    "model", f"the AWQ input scales of {names[0]} cannot move into {producer}: {exc}", "a model finalized with HQQ or GPTQ"
                ) from exc
            error = factor_error(module, form, s, folded["weight"])
            if error > FACTOR_TOLERANCE:  # AWQ now picks scales the norm stores; a model quantized before did not
                raise InvalidArgument(
                    "model",
                    f"{producer} ({module.weight.dtype}) cannot store the AWQ input scales of {names[0]} folded into it: a factor would be off by {error:.0%}",
                    "finalize the run again with finalizer=awq (its scales then fold exactly), or finalize it with HQQ or GPTQ",
                )
            overrides.update({f"{producer}.{k}": t for k, t in folded.items()})
        else:  # a linear: its output rows divide by s (a packed one through its group scales)
            if producer in quants:  # as AWQ's own fold makes them
                quants[producer] = rows_divided(quants[producer], s, dtype)
            else:
                overrides[f"{producer}.weight"] = (module.weight.float() / s[:, None]).to(module.weight.dtype)
            bias = overrides.get(producer + ".bias", getattr(module, "bias", None))
            if bias is not None:
                overrides[f"{producer}.bias"] = (bias.float() / s).to(bias.dtype)
        for n in names:
            quants[n] = dataclasses.replace(quants[n], input_scale=None)
    log.info("folded the AWQ input scales of %d layers into %d producers", len(scaled), len(readers))
    return quants, overrides


def quantization_config(groups: dict[tuple[int, str], list[str]], group_size: int) -> dict:
    """config.json's `quantization_config`: one config group per (bits, format)."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig
    from packaging.version import Version

    if any(fmt == PACKED for _, fmt in groups) and Version(compressed_tensors.__version__) >= Version("0.18"):
        log.warning(
            "compressed-tensors %s cannot load the asymmetric pack-quantized layers it writes here in transformers; 0.17.1 can", compressed_tensors.__version__
        )
    config_groups = {}
    for (bits, fmt), targets in sorted(groups.items()):
        weights = {"num_bits": bits, "type": "int", "symmetric": False, "strategy": "group", "group_size": group_size}
        if fmt == NAIVE:
            weights["zp_dtype"] = "torch.float32"
        config_groups[f"w{bits}_{'packed' if fmt == PACKED else 'naive'}"] = {"targets": targets, "weights": weights, "format": fmt}
    formats = {fmt for _, fmt in groups}
    config = {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": [],
        "version": compressed_tensors.__version__,
    }
    QuantizationConfig.model_validate(config)  # refuse here what the loader would refuse
    return config


def checkpoint(model: nn.Module, zero_points: ZeroPoints = "exact") -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, quantization_config) of a model whose quantized linears are PackedLinear."""
    if zero_points not in ("exact", "round"):
        raise InvalidArgument("zero_points", repr(zero_points), "exact, round")
    layers = packed_modules(model)
    if not layers:
        raise InvalidArgument("model", "has no PackedLinear layer", "a model from amq.load_quantized")
    _check_linear_layout(model)
    group_sizes = {m.group_size for m in layers.values()}
    if len(group_sizes) > 1:
        raise InvalidArgument("model", f"mixes group sizes {sorted(group_sizes)}", "one group size for all layers")
    quants, overrides = fold_input_scales(model, layers)
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[tuple[int, str], list[str]] = {}
    for name, q in quants.items():
        fmt, out = layer_tensors(name, q, overrides.get(name + ".bias"), zero_points)
        tensors.update(out)
        groups.setdefault((q.bits, fmt), []).append(name)
    seen: set[tuple] = set()  # tied tensors (embeddings and lm_head) once, as transformers saves them
    for key, t in model.state_dict().items():
        module = key.rpartition(".")[0]
        if module in layers:
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident not in seen:
            seen.add(ident)
            tensors[key] = overrides.get(key, t).detach().contiguous()
    return tensors, quantization_config(groups, group_sizes.pop())


def _check_linear_layout(model: nn.Module) -> None:
    """Refuse an architecture that transformers builds with weights other than nn.Linear (fused
    3-D experts, GPT-2's Conv1D): amq searched them as per-layer linears, which a compressed-tensors
    checkpoint loaded by plain transformers would not fill."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(model.config)
    if needs_linear_layers(fresh):
        raise InvalidArgument(
            "model",
            f"transformers builds {model.config.model_type} with weights that are not nn.Linear layers (fused 3-D expert tensors or Conv1D), "
            "so a compressed-tensors checkpoint of amq's per-expert linears would not load in it",
            "amq's own model directory: amq.load_quantized(dir) (docs/architectures.md)",
        )


def write_compressed_tensors(
    model: nn.Module,
    out_dir: str | Path,
    source_dir: str | Path | None = None,
    zero_points: ZeroPoints = "exact",
) -> Path:
    """Write `model` (as `amq.load_quantized` returns it) to `out_dir` as a compressed-tensors checkpoint.

    Why: so the model the search found can be shipped to anything that reads compressed-tensors
    (transformers, vLLM for the layouts its kernels take) without amq. `source_dir` (the amq
    model directory) supplies the tokenizer and generation config, copied unchanged.
    `zero_points="exact"` keeps amq's float zero points (layers with non-integer zeros are
    stored unpacked); `"round"` rounds them so every layer is bit-packed (not exact).
    Written into a temporary sibling and renamed into place, like `export.write_model_dir`.
    """
    tensors, qconfig = checkpoint(model, zero_points)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        config["quantization_config"] = qconfig
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if source_dir is not None:
            for pattern in COPIED_FILES:
                for f in Path(source_dir).glob(pattern):
                    shutil.copy2(f, tmp / f.name)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    formats = {g: len(c["targets"]) for g, c in qconfig["config_groups"].items()}
    log.info("wrote compressed-tensors model %s (%s)", out_dir, ", ".join(f"{g}: {n}" for g, n in formats.items()))
    return out_dir


def export_compressed_tensors(amq_dir: str | Path, out_dir: str | Path, zero_points: ZeroPoints = "exact") -> Path:
    """Convert an amq model directory (`<run>/models/<target>`) into a compressed-tensors one."""
    return write_compressed_tensors(load_quantized(amq_dir), out_dir, amq_dir, zero_points)


# vLLM's kernels for asymmetric weight-only `pack-quantized` groups, from its compressed-tensors WNA16
# path (read, not run here): with zero points, Marlin takes 4 bits at group 32/64/128, and Machete
# (Hopper GPUs such as H100/H200) 4 and 8 bits at group 64/128. `naive-quantized` layers have none.
VLLM_KERNELS: dict[int, tuple[tuple[int, ...], str]] = {
    4: ((32, 64, 128), "Marlin (any recent NVIDIA GPU) or Machete (Hopper)"),
    8: ((64, 128), "Machete (Hopper only)"),
}


def vllm_kernel(bits: int, fmt: str, group_size: int) -> str | None:
    """The vLLM kernel that serves an asymmetric weight-only group of this kind, None if none does."""
    groups, kernel = VLLM_KERNELS.get(bits, ((), None))
    return kernel if fmt == PACKED and group_size in groups else None


def vllm_widths() -> str:
    """What vLLM's kernels take, for messages: '4 bits at group 32/64/128 and 8 bits at group 64/128 (Hopper GPUs)'."""
    return " and ".join(f"{b} bits at group {'/'.join(map(str, g))}" for b, (g, _) in VLLM_KERNELS.items()) + " (Hopper GPUs)"


def check_vllm_servable(bits: list[int], group_size: int, shared: bool, integer_zero: bool) -> None:
    """`search.serve_with=vllm`: refuse, before the search, a setting whose checkpoints vLLM could not
    serve whole: a width or group size its kernels lack (`vllm_kernel`), sibling projections free to
    take different widths (vLLM fuses q/k/v and gate/up into one layer, which must have one scheme),
    or fractional zero points (`naive-quantized` layers, which no vLLM kernel reads)."""
    missing = [b for b in bits if vllm_kernel(b, PACKED, group_size) is None]
    if missing:
        raise InvalidArgument(
            "bits",
            f"{missing[0]}-bit at group {group_size} has no vLLM kernel",
            vllm_widths(),
        )
    if not shared:
        raise ConfigError(
            "search.share_groups",
            "null: q/k/v and gate/up could take different widths, and vLLM serves each fused set with one scheme",
            "search=amq_fused, or share_groups naming the sets vLLM fuses",
        )
    if not integer_zero:
        raise ConfigError(
            "finalizer.integer_zero", "false: fractional zero points give naive-quantized layers, which vLLM does not serve", "true (gptq, awq or hqq)"
        )


def compressed_tensors_summary(model_dir: str | Path) -> dict:
    """What a written checkpoint holds, per config group: width, format, layers, and vLLM's kernel."""
    qconfig = json.loads((Path(model_dir) / "config.json").read_text())["quantization_config"]
    groups = {}
    for name, group in qconfig["config_groups"].items():
        w = group["weights"]
        groups[name] = {
            "bits": w["num_bits"],
            "format": group["format"],
            "group_size": w["group_size"],
            "layers": len(group["targets"]),
            "vllm_kernel": vllm_kernel(w["num_bits"], group["format"], w["group_size"]),
        }
    return {"format": qconfig["format"], "groups": groups}
