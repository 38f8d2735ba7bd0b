"""Save a quantized model as a self-contained directory, and load it back.

Layout of `models/<target>/` (written to a temporary sibling and renamed into place):
  amq_packed.safetensors   packed weights (PackedLinear buffers) and every other tensor; not named
                           model.safetensors, so plain transformers finds no weights and refuses the
                           directory instead of loading random ones (directories of amq <= 0.1 used that name)
  config.json, tokenizer   as transformers writes them
  amq_quant.json           what the loader needs: format version, dtype, per-module packing
  bit_config.json          the bit configuration by module name (amq.bits.BitConfig, versioned)
  llama_cpp_tensor_types.txt   (llama layouts) per-tensor types for llama.cpp's quantize tool
  README.md                the model card
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from amq.bits import BitConfig
from amq.devices import DTYPES
from amq.errors import InvalidArgument
from amq.io import atomic_write_json, replace_dir
from amq.quantizers.packed import RUNTIMES, PackedLinear, set_runtime

log = logging.getLogger(__name__)

QUANT_FILE = "amq_quant.json"
BITCONFIG_FILE = "bit_config.json"
WEIGHTS_FILE = "amq_packed.safetensors"
LEGACY_WEIGHTS_FILE = "model.safetensors"  # what directories written before it was renamed hold
FORMAT = "amq-packed"
FORMAT_VERSION = 1
FAST = "fast"  # PackedLinear layers swapped for kernels that multiply by the packed bits (amq.runtime)
LOAD_RUNTIMES = (*RUNTIMES, FAST)


def packed_modules(model: nn.Module) -> dict[str, PackedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}


def quant_manifest(model: nn.Module, config: BitConfig, quantizer: dict[str, Any]) -> dict:
    """What the loader needs to rebuild the module tree before reading the tensors."""
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    modules = {
        n: {
            "bits": m.bits,
            "group_size": m.group_size,
            "in_features": m.in_features,
            "out_features": m.out_features,
            "has_bias": m.bias is not None,
            "has_input_scale": m.input_scale is not None,
        }
        for n, m in packed_modules(model).items()
    }
    return {"format": FORMAT, "version": FORMAT_VERSION, "dtype": dtype, "quantizer": quantizer, "group_size": config.group_size, "modules": modules}


def write_model_dir(
    out_dir: Path,
    model: nn.Module,
    tokenizer: Any,
    config: BitConfig,
    quantizer: dict[str, Any],
    extras: Callable[[Path], None] | None = None,
) -> Path:
    """Write the model directory atomically: into a temporary sibling, then one rename.

    `extras(tmp_dir)` writes further files (model card, llama.cpp types) before the rename.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        save_model(model, str(tmp / WEIGHTS_FILE))
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / QUANT_FILE, quant_manifest(model, config, quantizer))
        atomic_write_json(tmp / BITCONFIG_FILE, config.to_dict())
        if extras is not None:
            extras(tmp)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not (path / QUANT_FILE).is_file():
        raise InvalidArgument(
            "path",
            f"{path} holds no {QUANT_FILE} (the bit configuration of a quantized model)",
            "a directory written by amq finalize, e.g. <run dir>/models/<target>",
        )
    manifest = json.loads((path / QUANT_FILE).read_text())
    if manifest.get("format") != FORMAT or int(manifest.get("version", 0)) != FORMAT_VERSION:
        raise InvalidArgument("path", f"{path / QUANT_FILE} is format {manifest.get('format')} v{manifest.get('version')}", f"{FORMAT} v{FORMAT_VERSION}")
    return manifest


def read_bit_config(path: str | Path) -> BitConfig:
    return BitConfig.from_dict(json.loads((Path(path) / BITCONFIG_FILE).read_text()))


def _swap_in_empty_packed(model: nn.Module, modules: Mapping[str, dict], dtype: torch.dtype) -> None:
    for name, spec in modules.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if not isinstance(getattr(parent, child, None), nn.Linear):
            raise InvalidArgument(
                "path", f"module {name} of the bit configuration is not a Linear of this architecture", "a model directory written by amq finalize, unmodified"
            )
        setattr(
            parent,
            child,
            PackedLinear.empty(spec["in_features"], spec["out_features"], spec["bits"], spec["group_size"], spec["has_bias"], spec["has_input_scale"], dtype),
        )


def load_quantized(path: str | Path, device: str | torch.device = "cpu", runtime: str = "dequantized", compile: bool = False) -> nn.Module:
    """Rebuild a saved quantized model: a transformers causal LM whose linears are PackedLinear.

    `runtime="packed"` keeps the linears packed in memory and dequantizes them on every call
    (bits/16 of their bf16 memory, slower forwards); `dequantized` (the default) keeps each
    dequantized weight after its first call. `fast` keeps only the bits and multiplies by them
    with a kernel per width (`amq.runtime`, Triton on a GPU; layers no kernel serves stay packed);
    docs/benchmarks.md "Serving speed on one H200" has what it gains. `compile` fuses the
    dequantization with torch.compile (worth it for `packed` on a GPU; same outputs). The tokenizer
    sits next to the model: `transformers.AutoTokenizer.from_pretrained(path)`.
    """
    if runtime not in LOAD_RUNTIMES:  # before the model loads
        raise InvalidArgument("runtime", repr(runtime), ", ".join(LOAD_RUNTIMES))
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from amq.modeling.normalize import as_linear_layers

    path = Path(path)
    manifest = read_manifest(path)
    dtype = DTYPES[manifest["dtype"]]
    config = AutoConfig.from_pretrained(path)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    as_linear_layers(model, check=False)  # the module tree the model was saved from
    _swap_in_empty_packed(model, manifest["modules"], dtype)
    model.tie_weights()  # tied tensors are stored once; tying first lets the loader fill both names
    weights = path / WEIGHTS_FILE if (path / WEIGHTS_FILE).is_file() else path / LEGACY_WEIGHTS_FILE
    missing, unexpected = load_model(model, str(weights), strict=False, device="cpu")
    if missing or unexpected:
        raise InvalidArgument(
            "path",
            f"{weights} does not match its config (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})",
            "an unmodified directory written by amq finalize",
        )
    set_runtime(model, "packed" if runtime == FAST else runtime, compile)
    model = model.to(device).eval()
    if runtime == FAST:  # converted on its device: a kernel's layout can depend on it
        from amq.runtime import convert

        convert(model)
    log.info("loaded quantized model %s (%d packed linears, %s runtime)", path, len(manifest["modules"]), runtime)
    return model


def directory_bytes(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
