"""A GGUF to ship for each amq model: the search's per-tensor plan, quantized by llama.cpp itself.

What `amq-export --format gguf` runs, per model directory: the unquantized model converted once
(llama.cpp's convert_hf_to_gguf.py), an importance matrix on amq's calibration split, then
llama-quantize with the plan's per-tensor types (`gguf_plan`: each width's K-quant where a row
allows it). The tensors the search does not touch (token embedding, output, norms) take the types
of one of llama.cpp's mixes, `base_mix` (Q4_K_M by default, the mix llama.cpp's users most often
pick). Each file is then measured as llama.cpp measures it (`gguf_eval`): held-out perplexity and
KL divergence from the unquantized GGUF on every held-out text of the run, written beside it as
`eval.json` with a `README.md` that says how to run it. scripts/llama_cpp.py measures such files
against llama.cpp's uniform mixes. The converted model, the imatrix and the unquantized model's
held-out logits live in the run's `llama_cpp/` folder, the script's, so each reuses what the other made.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from amq.errors import ConfigError
from amq.llamacpp import gguf_plan, run
from amq.llamacpp.build import LlamaCpp
from amq.llamacpp.gguf_eval import CARD_FILE, DEFAULT_EVAL_CHUNKS, EVAL_FILE, Made, evaluate
from amq.llamacpp.inputs import Inputs, Plan, require_architecture
from amq.llamacpp.pipeline import UNIFORM_MIXES, base_and_imatrix, check_base, gguf_shapes

log = logging.getLogger(__name__)

DEFAULT_BASE_MIX = "Q4_K_M"
GGUF_DIR = "gguf"  # <model dir>/gguf/, beside <model dir>/compressed-tensors/


@dataclass(frozen=True)
class GgufSettings:
    """How the GGUFs are made: the mix of the tensors outside the plan, the unquantized GGUF's type, the tools' options."""

    base_mix: str = DEFAULT_BASE_MIX
    outtype: str = "f32"
    tools: run.ToolOptions = run.ToolOptions(imatrix_chunks=20, chunks=DEFAULT_EVAL_CHUNKS)
    evaluate: bool = True  # held-out perplexity and KLD of each file (gguf/eval.json)
    speed: bool = False  # and its decode and prefill tokens/s on this CPU (llama-bench, built on first use)

    def check(self) -> None:
        if self.base_mix not in UNIFORM_MIXES:
            raise ConfigError("--base-mix", self.base_mix, ", ".join(UNIFORM_MIXES))
        if self.speed and not self.evaluate:
            raise ConfigError("--speed", "the speed is part of the evaluation, which --no-eval turns off", "--speed without --no-eval")
        check_base(self.outtype, self.tools)


def check_out(n_models: int, out: Path | None) -> None:
    """`--out` names one model's folder: refused for several."""
    if out is not None and n_models > 1:
        raise ConfigError("--out", f"{n_models} models to export", "omit --out for a run directory")


def gguf_name(model_name: str, plan: Plan) -> str:
    return f"{model_name}-amq-{plan.label}.gguf"


def export_gguf(inputs: Inputs, lc: LlamaCpp, settings: GgufSettings, out: Path | None = None) -> list[Path]:
    """One GGUF per plan of `inputs` (in `<model dir>/gguf/`, or `out` for a single plan); returns their paths.

    Each file is written under a temporary name and renamed once llama-quantize succeeded; a new
    export replaces an earlier one of the same model."""
    require_architecture(inputs)
    check_out(len(inputs.plans), out)
    work = (inputs.run_dir or inputs.plans[0].source) / "llama_cpp"
    base, im, _ = base_and_imatrix(lc, inputs, work, settings.outtype, settings.tools)
    rows, numels = gguf_shapes(base)
    written: list[Made] = []
    for p in inputs.plans:
        try:
            choices = gguf_plan.plan(p.config, rows)
        except ConfigError as exc:
            raise ConfigError("path", f"{p.source}: {exc.problem}", exc.valid) from None
        planned = {c.tensor: c.ggml_type for c in choices}
        path = (out or p.source / GGUF_DIR) / gguf_name(inputs.model_name, p)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in (EVAL_FILE, CARD_FILE):  # they describe the file about to be replaced
            (path.parent / stale).unlink(missing_ok=True)
        q = run.quantize(lc, base, path, settings.base_mix, im, settings.tools, planned, reuse=False)
        differs = {t: (ty, q.types.get(t)) for t, ty in planned.items() if q.types.get(t) != ty}
        if differs:  # the plan chooses types each row allows, so this would be a llama.cpp that decided otherwise
            log.warning("%s: llama-quantize wrote %d planned tensors in another type, e.g. %s", path, len(differs), next(iter(differs.items())))
        made = Made(p, path, q.file_bytes, len(choices), gguf_plan.planned_bpw(choices, numels), tuple(sorted(planned.items())))
        log.info(
            "%s: %s, %.1f MiB, %d tensors at the plan's types (%.2f bits a linear weight), the rest as %s",
            p.label, path, made.file_bytes / 2**20, made.tensors, made.bpw_linears, settings.base_mix,
        )  # fmt: skip
        written.append(made)
    if settings.evaluate:
        evaluate(lc, inputs, work, base, written, settings.tools, settings.base_mix, settings.outtype, settings.speed)
    return [m.path for m in written]
