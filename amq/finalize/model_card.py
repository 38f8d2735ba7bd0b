"""The model card (README.md) written next to every exported model."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, Mapping

from amq.bits import CONVENTION_WEIGHTS_ONLY, CONVENTION_WITH_META, BitConfig
from amq.quantizers.compressed_tensors import vllm_widths


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def render(info: dict[str, Any], config: BitConfig, evaluation: dict | None) -> str:
    """Markdown: what the model is, how it was quantized, its size and its measured quality."""
    widths = Counter(config.bits.values())
    lines = [
        f"# {info['model']} quantized by amq: {info['avg_bits']:.3f} average bits",
        "",
        f"Mixed-precision weight-only quantization of `{info['model']}` (fingerprint `{info['fingerprint']}`), "
        f"selected by the amq search for a budget of {info['target']:g} average bits ({info['bits_convention']}) "
        f"and quantized with {info['quantizer']['name']} (group size {config.group_size}).",
        "",
        "## Bits",
        f"- {info['avg_bits']:.4f} average bits: {CONVENTION_WITH_META}",
        f"- {info['avg_bits_weights_only']:.4f} average bits: {CONVENTION_WEIGHTS_ONLY}",
        "- linears per width: " + ", ".join(f"{b}-bit: {widths[b]}" for b in sorted(widths)),
        f"- proxy {info['metric_name']} during the search: {info['proxy_metric']:.6g}",
        "",
        "## Size",
        f"- on disk (this directory): {_mb(info['bytes_on_disk'])}; weights file {_mb(info['bytes_weights_file'])}",
        f"- the same model in bf16: {_mb(info['bytes_bf16'])}",
        f"- quantized linears: {_mb(info['bytes_packed_linears'])} packed, against {_mb(info['bytes_linears_bf16'])} in bf16",
        "",
        "## Quantizer",
        "```json",
        json.dumps(info["quantizer"], indent=2),
        "```",
    ]
    if evaluation:
        lines += ["", "## Evaluation", "", "| held-out text | perplexity | tokens |", "| --- | --- | --- |"]
        for name, r in evaluation["perplexity"].items():
            lines.append(f"| {name} | {r['perplexity']:.4f} | {r['tokens']} |")
        for task, r in (evaluation.get("zero_shot") or {}).items():
            acc = "-" if r.get("acc") is None else f"{r['acc']:.4f}"
            lines.append(f"| {task} ({r.get('num_fewshot') or 0}-shot accuracy) | {acc} | n={r.get('n')} |")
        lines += ["", "Protocol:", "```json", json.dumps(evaluation["protocol"], indent=2), "```"]
    lines += [
        "",
        "## Use",
        "```python",
        "import amq, transformers",
        f'path = "{info["dir_name"]}"  # where it was written; any copy of this directory loads the same',
        'model = amq.load_quantized(path)  # runtime="packed": linears stay packed in memory, slower calls',
        '# on a GPU: amq.load_quantized(path, "cuda", runtime="fast") multiplies by the packed bits (amq.runtime)',
        "tokenizer = transformers.AutoTokenizer.from_pretrained(path)",
        "```",
        "`bit_config.json` holds the bits of every linear by module name"
        + (
            "; `llama_cpp_tensor_types.txt` the same as llama.cpp quantize types (`amq-export <this directory> --format gguf` writes the GGUF in `gguf/`, with llama.cpp's held-out perplexity and KLD of it in `gguf/eval.json`)."
            if info.get("llama_cpp")
            else "."
        ),
        "Plain transformers refuses this directory (its weights are in `amq_packed.safetensors`, a format only amq reads) rather than load random weights.",
        "",
    ]
    lines += _standard_formats(info, _split_siblings(config.bits))
    return "\n".join(lines)


def _standard_formats(info: dict[str, Any], split: list[str]) -> list[str]:
    """The compressed-tensors checkpoint next to amq's own: how to load it, which groups vLLM serves."""
    lines: list[str] = []
    for fmt, r in (info.get("formats") or {}).items():
        lines += ["", f"## Without amq: `{fmt}/`"]
        if not r["written"]:
            lines += ["", f"Not written for this model: {r['why']}.", ""]
            continue
        lines += [
            "",
            f"A {r['format']} checkpoint ({_mb(r['bytes_on_disk'])}) that transformers loads with the `compressed-tensors` package, no amq:",
            "```python",
            "import transformers",
            f'model = transformers.AutoModelForCausalLM.from_pretrained("{info["dir_name"]}/{fmt}")',
            "```",
            "",
            "| config group | bits | format | layers | vLLM kernel |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, g in r["groups"].items():
            lines.append(f"| {name} | {g['bits']} | {g['format']} | {g['layers']} | {g['vllm_kernel'] or 'none: not servable by vLLM'} |")
        lines += ["", _vllm_note(r["groups"], f"{info['dir_name']}/{fmt}", split), ""]
    return lines


def _split_siblings(bits: Mapping[str, int | None]) -> list[str]:
    """Modules whose sibling projections (`amq.runtime.fuse.SIBLINGS`: q/k/v, gate/up, the sets
    vLLM fuses into one layer, which must have one scheme) hold different widths."""
    from amq.runtime.fuse import SIBLINGS

    split = []
    for name in bits:
        parent, _, child = name.rpartition(".")
        for group in SIBLINGS:
            if child == group[0] and len({bits.get(f"{parent}.{c}") for c in group if f"{parent}.{c}" in bits}) > 1:
                split.append(parent)
    return split


def _vllm_note(groups: dict, path: str, split: list[str]) -> str:
    """Whether vLLM serves the checkpoint whole, and what would make it do so."""
    if all(g["vllm_kernel"] for g in groups.values()) and not split:
        return f"`vllm serve {path}` serves it: every group has a kernel, and the projections vLLM fuses share a width."
    note = "vLLM cannot serve this model whole; transformers runs all of it."
    if any(g["format"] == "naive-quantized" for g in groups.values()):
        note += (
            " `naive-quantized` groups keep one byte per weight: their zero points are fractional (HQQ's optimised zeros, the min-max"
            " grid's -min/scale), which `pack-quantized` cannot hold; `finalizer.integer_zero=true` rounds them to whole codes, so every"
            " layer packs (`amq-finalize <run> finalizer.integer_zero=true` does it from the finished run)."
        )
    if any(g["format"] != "naive-quantized" and not g["vllm_kernel"] for g in groups.values()):
        note += f" vLLM's kernels take {vllm_widths()}; `search.bits=[4,8]` keeps the search to those widths."
    if split:
        note += (
            f" vLLM fuses q/k/v and gate/up into one layer with one scheme, and {len(split)} of this model's sets mix widths (e.g. {split[0]});"
            " `search=amq_fused` keeps each set at one width."
        )
    return note + " `experiment=vllm` sets up a search whose checkpoints vLLM serves whole."
