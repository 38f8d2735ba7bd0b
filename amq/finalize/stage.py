"""Stage: turn a searched run into real quantized models, evaluate them, and check the proxy.

For each budget in `finalize.targets`: pick the archived configuration (selection.py), quantize
the model for real with the chosen final quantizer, evaluate it on held-out text, and save it
under `<run>/models/<target>/`. Then measure the baselines (the unquantized model, uniform widths
that fit the same budgets) and a few extra front points, and report how well the proxy's ranking
carries over to the deployed models (`evaluation.json`, `evaluation.md`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from amq.bits import BitConfig, average_bits, meta_overhead
from amq.errors import InvalidArgument
from amq.evaluation.report import fidelity, write_report
from amq.evaluation.suite import EvalSuite
from amq.evaluation.zeroshot import LM_EVAL_RESULTS, write_lm_eval_results
from amq.finalize.charts import write_charts
from amq.finalize.model_card import render
from amq.finalize.selection import Candidate, front_extras, read_candidates, select_for_targets
from amq.finalize.settings import FinalizeSettings
from amq.io import atomic_write_json, atomic_write_text
from amq.modeling.discovery import ModelLayout
from amq.modeling.loading import LoadedModel
from amq.quantizers import llamacpp
from amq.quantizers.base import FinalQuantizer, quantizer_info
from amq.quantizers.compressed_tensors import compressed_tensors_summary, fold_input_scales, write_compressed_tensors
from amq.quantizers.export import BITCONFIG_FILE, QUANT_FILE, WEIGHTS_FILE, directory_bytes, packed_modules, write_model_dir
from amq.quantizers.hqq import group_quant_from_proxy
from amq.quantizers.packed import GroupQuant, replace_linears

log = logging.getLogger(__name__)


@contextlib.contextmanager
def packed_swap(model: nn.Module, quants: Mapping[str, GroupQuant]) -> Iterator[nn.Module]:
    """Swap PackedLinear modules in for the duration, then put the original linears back."""
    originals = {n: model.get_submodule(n) for n in quants}
    replace_linears(model, quants, next(model.parameters()).dtype)
    try:
        yield model
    finally:
        for name, module in originals.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module)


@contextlib.contextmanager
def in_shipped_form(model: nn.Module) -> Iterator[nn.Module]:
    """The packed model with its AWQ input scales moved into the modules that produce their inputs
    (norms, linears), as the compressed-tensors checkpoint holds them, for the duration.

    Why: bfloat16 rounds a folded norm's output where amq rounds `W / s`, so the two forms differ
    by 0.1-0.5% in perplexity; evaluating and saving this form makes eval.json what the checkpoint
    gives. Scales that cannot move (AWQ with fold=false) stay, and the export then refuses them.
    """
    layers = packed_modules(model)
    if not any(m.input_scale is not None for m in layers.values()):
        yield model
        return
    try:
        quants, overrides = fold_input_scales(model, layers)
    except InvalidArgument as exc:
        log.info("input scales kept in the layers (%s)", exc.problem)
        yield model
        return
    originals = []  # (the model's tensor, its values before the fold)
    for name, tensor in overrides.items():
        parent, _, attr = name.rpartition(".")
        current = getattr(model.get_submodule(parent), attr)
        originals.append((current, current.detach().clone()))
        current.data.copy_(tensor)
    for name, q in quants.items():  # only layers the fold changed; they go when `packed_swap` ends
        layer = layers[name]
        if layer.input_scale is not None or not torch.equal(layer.scale, q.scale):
            layer.scale.copy_(q.scale)
            layer.input_scale = None
            layer._dequantized = None
    try:
        yield model
    finally:
        for current, values in originals:
            current.data.copy_(values)


def _as_json(value: Any) -> Any:
    """`value` as a JSON file holds it (tuples as lists, keys as strings), to compare with one read back."""
    return json.loads(json.dumps(value))


def bf16_bytes(model: nn.Module, names: Mapping[str, Any] | None = None) -> int:
    """Bytes at 2 per parameter: the whole model (tied weights once) or the named modules' weights."""
    if names is None:
        return 2 * sum(p.numel() for p in model.parameters())
    return 2 * sum(model.get_submodule(n).weight.numel() for n in names)


def uniform_baselines(layout: ModelLayout, widths: list[int], group_size: int, targets: list[float], convention: str) -> list[BitConfig]:
    """For each target, the widest uniform width that fits it (each width once)."""
    extra = meta_overhead(group_size) if convention == "with_meta" else 0.0
    chosen = []
    for t in targets:
        fit = [b for b in widths if b + extra <= t + 1e-9]
        if fit and max(fit) not in chosen:
            chosen.append(max(fit))
    return [BitConfig({n: b for n in layout.names}, group_size) for b in sorted(chosen)]


@dataclass
class Finalizer:
    """Runs the stage for one loaded model and run directory."""

    run_dir: Path
    lm: LoadedModel
    layout: ModelLayout
    quantizer: FinalQuantizer
    settings: FinalizeSettings
    suite: EvalSuite | None
    metric_name: str
    calib: torch.Tensor | None = None
    out_dir: Path | None = None  # where models/ and the reports go (None: the run directory)
    # (width, group size) -> the search's proxy results with this quantizer's settings ({name: (packed, meta)}), or None
    proxy_results: Callable[[int, int], dict | None] | None = None
    # a continued run (resume): keep models/<target>/ folders its stopped process finished for the same configuration
    keep_finished: bool = False
    _memo: dict[tuple[str, int, int], GroupQuant] = field(default_factory=dict, repr=False)
    _evaluations: dict[tuple, tuple[str, dict]] = field(default_factory=dict, repr=False)  # configuration -> (label, result)
    _last_calibrated: tuple[tuple, dict[str, GroupQuant]] | None = field(default=None, repr=False)  # (configuration, result)

    @property
    def output_dir(self) -> Path:
        return self.out_dir or self.run_dir

    def _quantize(self, config: BitConfig) -> dict[str, GroupQuant]:
        """Quantize for real. A calibration-free quantizer's result for a linear depends only on its
        weight and width, so those are remembered across the configurations of the stage, and taken
        from the search's proxy where it ran with the same settings (`proxy_results`). A calibrating
        one's result is kept for its last configuration only (a byte per weight: gigabytes at 7B),
        which is the one two targets selecting the same configuration ask for again."""
        t0 = time.perf_counter()
        reused = 0
        if self.quantizer.needs_calibration:
            if self._last_calibrated is not None and self._last_calibrated[0] == config.key():
                log.info("%s: the configuration quantized last, whose result is reused", self.quantizer.name)
                return self._last_calibrated[1]
            self._last_calibrated = None  # freed before the next pass: the stage's peak memory stays one configuration's
            quants = self.quantizer.quantize(self.lm.model, self.layout, config.bits, config.group_size, self.calib)
            self._last_calibrated = (config.key(), quants)
        else:
            todo = {n: b for n, b in config.bits.items() if (n, b, config.group_size) not in self._memo}
            fresh = self._from_proxy(todo, config.group_size)
            reused = len(fresh)
            if len(fresh) < len(todo):
                rest = {n: b for n, b in todo.items() if n not in fresh}
                fresh.update(self.quantizer.quantize(self.lm.model, self.layout, rest, config.group_size, None))
            self._memo.update({(n, todo[n], config.group_size): q for n, q in fresh.items()})
            quants = {n: self._memo[(n, b, config.group_size)] for n, b in config.bits.items()}
        took = time.perf_counter() - t0
        log.info("%s: quantized %d linears in %.1fs%s", self.quantizer.name, len(quants), took, f" ({reused} from the proxy's cache)" if reused else "")
        return quants

    def _from_proxy(self, todo: Mapping[str, int], group_size: int) -> dict[str, GroupQuant]:
        """The linears of `todo` the search's proxy quantized as this quantizer would, from its cache."""
        if self.proxy_results is None or not todo:
            return {}
        out: dict[str, GroupQuant] = {}
        for width in sorted(set(todo.values())):  # read per configuration, not held: at 7B a width's file is GBs
            cached = self.proxy_results(width, group_size)
            if cached is None:
                continue
            for name in (n for n, b in todo.items() if b == width and n in cached):
                try:
                    out[name] = group_quant_from_proxy(*cached[name], self.lm.model.get_submodule(name).weight, width)
                except ValueError as exc:  # not what this quantizer makes after all: quantize it
                    log.warning("%s: %s; quantizing it again", name, exc)
        return out

    def _evaluate(self, label: str, config: BitConfig | None = None, keep_lm_eval: bool = False) -> dict | None:
        """The suite's numbers for the model as it is now, holding `config` (None: unquantized).

        A configuration this stage measured before (two targets that select the same one, a uniform
        baseline that a target selected) is not measured again: the same weights give the same
        numbers, and on a large model with zero-shot tasks one evaluation takes many minutes."""
        if self.suite is None or not self.settings.evaluate:
            return None
        key = None if config is None else config.key()  # one group size a stage
        seen = self._evaluations.get(key) if key is not None else None
        wants_lm_eval = keep_lm_eval and bool(self.suite.tasks.tasks)  # lm-eval's own results, which `measure` drops
        if seen is not None and ("lm_eval" in seen[1] or not wants_lm_eval):
            log.info("%s: the configuration of %s, whose evaluation is reused", label, seen[0])
            result = {**copy.deepcopy(seen[1]), "same_as": seen[0]}  # eval.json says whose numbers these are
            if not keep_lm_eval:
                result.pop("lm_eval", None)
            return result
        result = self.suite.run(self.lm.model, self.lm.tokenizer, label, keep_lm_eval=keep_lm_eval)
        if key is not None:
            self._evaluations[key] = (label, copy.deepcopy(result))
        return result

    def _bits(self, config: BitConfig) -> tuple[float, float]:
        numels = self.layout.numels
        return (average_bits(config.bits, numels, config.group_size), average_bits(config.bits, numels, config.group_size, with_meta=False))

    def _row(self, kind: str, bits: tuple[float, float], proxy: float | None, evaluation: dict | None, **extra: Any) -> dict:
        row = {"kind": kind, "avg_bits": bits[0], "avg_bits_weights_only": bits[1], "proxy_" + self.metric_name: proxy, **extra}
        if evaluation:
            row["perplexity"] = {k: v["perplexity"] for k, v in evaluation["perplexity"].items()}
            if evaluation.get("zero_shot"):
                row["zero_shot"] = {k: v.get("acc") for k, v in evaluation["zero_shot"].items()}
                row["zero_shot_norm"] = {k: v.get("acc_norm") for k, v in evaluation["zero_shot"].items()}
        return row

    def export(self, target: float, cand: Candidate) -> dict:
        """Quantize, evaluate and save one selected configuration under models/<target>/."""
        out_dir = self.output_dir / "models" / f"{target:g}"
        model, config = self.lm.model, cand.config
        total_bf16 = bf16_bytes(model)
        kept = self._finished(out_dir, config) if self.keep_finished else None
        if kept is not None:
            log.info("models/%s: finished by the stopped run for this configuration and settings, kept", out_dir.name)
            if kept:
                self._evaluations[config.key()] = (f"{target:g} bits", copy.deepcopy(kept))
            return self._row(
                "target",
                self._bits(config),
                cand.metric,
                kept or None,
                target=target,
                dir=str(out_dir),
                bytes_on_disk=directory_bytes(out_dir),
                bytes_bf16=total_bf16,
            )
        linears_bf16 = bf16_bytes(model, config.bits)
        with packed_swap(model, self._quantize(config)), in_shipped_form(model):
            evaluation = self._evaluate(f"{target:g} bits", config, keep_lm_eval=True)
            lm_eval_results = evaluation.pop("lm_eval", None) if evaluation is not None else None  # its own file, not eval.json
            packed = sum(b.numel() * b.element_size() for m in packed_modules(model).values() for b in m.buffers())
            info = {
                "model": self.lm.name,
                "fingerprint": self.lm.fingerprint,
                "target": target,
                "bits_convention": self.settings.bits_convention,
                "avg_bits": cand.avg_bits,
                "avg_bits_weights_only": cand.avg_bits_weights_only,
                "metric_name": self.metric_name,
                "proxy_metric": cand.metric,
                "quantizer": quantizer_info(self.quantizer),
                "bytes_bf16": total_bf16,
                "bytes_linears_bf16": linears_bf16,
                "bytes_packed_linears": packed,
                "dir_name": str(out_dir),
                "llama_cpp": False,
            }

            def extras(tmp: Path) -> None:
                types = self._llama_cpp_types(config)
                if types is not None:
                    atomic_write_text(tmp / "llama_cpp_tensor_types.txt", llamacpp.tensor_type_file(types))
                    info["llama_cpp"] = True
                info["bytes_weights_file"] = (tmp / WEIGHTS_FILE).stat().st_size
                info["bytes_on_disk"] = directory_bytes(tmp)
                info["formats"] = self._standard_formats(model, tmp, out_dir.name)
                if evaluation is not None:
                    atomic_write_json(tmp / "eval.json", {"model_dir": str(out_dir), **evaluation})
                if lm_eval_results is not None:
                    write_lm_eval_results(tmp / LM_EVAL_RESULTS, lm_eval_results)
                atomic_write_text(tmp / "README.md", render(info, config, evaluation))

            write_model_dir(out_dir, model, self.lm.tokenizer, config, info["quantizer"], extras)
        log.info("saved %s (%.1f MiB on disk, bf16 %.1f MiB)", out_dir, info["bytes_on_disk"] / 2**20, total_bf16 / 2**20)
        return self._row(
            "target", self._bits(config), cand.metric, evaluation, target=target, dir=str(out_dir), bytes_on_disk=info["bytes_on_disk"], bytes_bf16=total_bf16
        )

    def _finished(self, out_dir: Path, config: BitConfig) -> dict | None:
        """What a stopped process of this run measured for the model folder it finished at `out_dir`
        ({} when the stage does not evaluate), or None unless that folder holds this configuration,
        quantized and saved as this stage would (quantizer and its settings, standard formats) and
        evaluated under this stage's protocol. Folders are published whole (`write_model_dir`), so
        one that exists is complete."""
        try:
            if json.loads((out_dir / BITCONFIG_FILE).read_text()) != _as_json(config.to_dict()):
                return None
            if json.loads((out_dir / QUANT_FILE).read_text()).get("quantizer") != _as_json(quantizer_info(self.quantizer)):
                return None
            if any(not (out_dir / fmt).is_dir() for fmt in self.settings.formats):
                return None
            if self.suite is None or not self.settings.evaluate:
                return {}
            evaluation = json.loads((out_dir / "eval.json").read_text())
        except (OSError, ValueError):
            return None
        if evaluation.get("protocol") != _as_json(self.suite.describe(self.lm.model)):
            return None
        if self.suite.tasks.tasks and not (out_dir / LM_EVAL_RESULTS).is_file():
            return None
        return {k: v for k, v in evaluation.items() if k not in ("model_dir", "history", "reproduction")}

    def _standard_formats(self, model: nn.Module, model_dir: Path, label: str) -> dict[str, dict]:
        """Write the standard checkpoints `finalize.formats` asks for into subfolders of `model_dir`;
        per format, where it went and its size, or why this model has no such checkpoint."""
        writers = {"compressed-tensors": write_compressed_tensors}  # one per name in finalize.settings.FORMATS
        out: dict[str, dict] = {}
        for fmt in self.settings.formats:
            target = model_dir / fmt
            try:
                writers[fmt](model, target, source_dir=model_dir)
            except InvalidArgument as exc:  # a layer the format cannot hold (AWQ's input scales)
                log.warning("models/%s: no %s checkpoint: %s", label, fmt, exc.problem)
                out[fmt] = {"written": False, "why": exc.problem}
                continue
            out[fmt] = {"written": True, "dir": fmt, "bytes_on_disk": directory_bytes(target), **compressed_tensors_summary(target)}
        return out

    def measure(self, kind: str, config: BitConfig, proxy: float | None, label: str) -> dict:
        """Quantize and evaluate without saving (front points and uniform baselines)."""
        with packed_swap(self.lm.model, self._quantize(config)), in_shipped_form(self.lm.model):
            return self._row(kind, self._bits(config), proxy, self._evaluate(label, config))

    def _llama_cpp_types(self, config: BitConfig) -> dict[str, str] | None:
        if getattr(self.lm.model.config, "model_type", None) not in llamacpp.LLAMA_CPP_ARCHITECTURES:
            return None
        # each tensor's row length (its input width) decides which ggml types it can take
        try:
            return llamacpp.tensor_types(config, llamacpp.row_lengths(self.layout.linears))
        except ValueError as exc:
            log.warning("no llama.cpp tensor types: %s", exc)
            return None

    def run(self, widths: list[int]) -> dict:
        t0 = time.perf_counter()
        candidates = read_candidates(self.run_dir / "archive.jsonl", self.metric_name)
        selections = select_for_targets(candidates, self.settings.targets, self.settings.bits_convention)
        rows = [self.export(s.target, s.candidate) for s in selections]
        chosen = [s.candidate for s in selections]
        for c in front_extras(candidates, chosen, self.settings.extra_front_points, self.settings.bits_convention):
            rows.append(self.measure("front", c.config, c.metric, f"front {c.avg_bits:.3f} bits"))
        if self.settings.baselines and self.settings.evaluate and self.suite is not None:
            proxy_of = {c.config.key(): c.metric for c in candidates}
            rows.append(self._row("unquantized", (16.0, 16.0), 0.0, self._evaluate("unquantized")))
            group = chosen[0].config.group_size
            for cfg in uniform_baselines(self.layout, widths, group, list(self.settings.targets), self.settings.bits_convention):
                b = next(iter(cfg.bits.values()))
                rows.append(self.measure("uniform", cfg, proxy_of.get(cfg.key()), f"uniform {b}-bit"))
        report = {
            "model": self.lm.name,
            "quantizer": quantizer_info(self.quantizer),
            "bits_convention": self.settings.bits_convention,
            "protocol": self.suite.describe(self.lm.model) if self.suite is not None and self.settings.evaluate else None,
            "rows": rows,
            "proxy_fidelity": fidelity(rows, "proxy_" + self.metric_name),
            "seconds": time.perf_counter() - t0,
        }
        write_report(self.output_dir, report)
        write_charts(report, self.output_dir)
        return report
