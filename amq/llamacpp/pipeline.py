"""The whole llama.cpp comparison for one model: convert, imatrix, quantize, measure, report.

Order and why: the unquantized GGUF is converted once (f32 by default: the embedded models'
weights are dequantized floats, and f32 holds them exactly); the importance matrix is computed on
it from amq's calibration split and used by every quantization, uniform and amq alike; the
unquantized model's held-out logits are saved once, so every quantized GGUF is measured on the
same tokens against the same reference. Uniform mixes run first: each amq plan's tensors outside
the search (token embedding, output, norms) follow the uniform mix whose decoder-linear bits are
closest to the plan's, so amq's GGUF differs from that mix only where the search decided.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amq.bits import CONVENTION_WITH_META, average_bits
from amq.errors import ConfigError
from amq.io import atomic_write_text
from amq.llamacpp import gguf_plan, run
from amq.llamacpp.build import LlamaCpp, ensure_tool
from amq.llamacpp.inputs import Inputs, Plan
from amq.llamacpp.report import Row, make_row, write_report

log = logging.getLogger(__name__)

# llama-quantize's mixes we offer as the uniform baselines (its ftype names)
UNIFORM_MIXES = (
    "Q2_K",
    "Q2_K_S",
    "Q3_K_S",
    "Q3_K_M",
    "Q3_K_L",
    "Q4_0",
    "Q4_1",
    "Q4_K_S",
    "Q4_K_M",
    "Q5_0",
    "Q5_1",
    "Q5_K_S",
    "Q5_K_M",
    "Q6_K",
    "Q8_0",
    "IQ4_NL",
    "IQ4_XS",
)
DEFAULT_MIXES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0")
OUTTYPES = ("f32", "bf16", "f16")


@dataclass(frozen=True)
class Settings:
    mixes: tuple[str, ...]
    outtype: str = "f32"
    heldout: str | None = None  # which held-out text (None: the first)
    base_mix: str | None = None  # the mix amq plans follow outside the linears (None: nearest in linear bits)
    tools: run.ToolOptions = run.ToolOptions()
    speed: bool = False  # also decode and prefill tokens/s of every GGUF (llama-bench, built on first use)

    def check(self) -> None:
        bad = [m for m in self.mixes if m not in UNIFORM_MIXES]
        if bad or not self.mixes:
            raise ConfigError("--mixes", f"{', '.join(bad) or 'none given'}", ", ".join(UNIFORM_MIXES))
        if self.base_mix is not None and self.base_mix not in self.mixes:
            raise ConfigError("--base-mix", f"{self.base_mix} is not among --mixes", ", ".join(self.mixes))
        check_base(self.outtype, self.tools)


def check_base(outtype: str, tools: run.ToolOptions) -> None:
    """The settings `base_and_imatrix` takes (the unquantized GGUF's type, the tools' counts), checked before any build."""
    if outtype not in OUTTYPES:
        raise ConfigError("--outtype", outtype, ", ".join(OUTTYPES))
    tools.check()


def _tag(opts: run.ToolOptions, chunks: int | None) -> str:
    return f"c{opts.ctx}-n{chunks or 'all'}"


def gguf_shapes(path: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Row length (ne[0]) and element count of every tensor of a GGUF."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    rows, numels = {}, {}
    for t in reader.tensors:
        rows[t.name] = int(t.shape[0])
        numels[t.name] = int(t.n_elements)
    return rows, numels


def _pick_base_mix(planned: float, uniform: list[Row]) -> str:
    return min(uniform, key=lambda r: abs((r.bpw_linears or 0.0) - planned)).ftype


def base_and_imatrix(lc: LlamaCpp, inputs: Inputs, out_dir: Path, outtype: str, opts: run.ToolOptions) -> tuple[Path, Path, str]:
    """(the unquantized GGUF, its importance matrix on amq's calibration split, the imatrix's tag)
    under `out_dir`, each made once: every later quantization of the model starts from these two."""
    calib = out_dir / "text" / "calibration.txt"
    atomic_write_text(calib, "\n\n".join(inputs.splits.calibration) + "\n")
    base = run.convert(lc, inputs.model_dir, out_dir / "gguf" / f"{inputs.model_name}-{outtype}.gguf", outtype)
    im_tag = _tag(opts, opts.imatrix_chunks)
    return base, run.imatrix(lc, base, calib, out_dir / f"imatrix-{im_tag}.gguf", opts), im_tag


def heldout_reference(lc: LlamaCpp, inputs: Inputs, out_dir: Path, base: Path, heldout: str, opts: run.ToolOptions) -> tuple[Path, run.Perplexity, str]:
    """(the unquantized GGUF's saved logits on held-out text `heldout`, its perplexity there, the
    measurement's tag): what every quantized GGUF's perplexity and KL divergence are measured
    against, on the same tokens. Made once per base GGUF, text, context and chunk count."""
    held = out_dir / "text" / f"heldout-{heldout}.txt"
    atomic_write_text(held, "\n\n".join(inputs.splits.heldout[heldout]) + "\n")
    ppl_tag = f"{heldout}-{_tag(opts, opts.chunks)}"
    logits = out_dir / "logits" / f"{base.stem}-{ppl_tag}.kld"
    return logits, run.base_logits(lc, base, held, logits, opts), ppl_tag


def run_all(inputs: Inputs, lc: LlamaCpp, out_dir: Path, s: Settings) -> tuple[Path, Path]:
    """Every GGUF measured, the table written; returns (markdown, json)."""
    t0 = time.perf_counter()
    heldout = s.heldout or next(iter(inputs.splits.heldout))
    if heldout not in inputs.splits.heldout:
        raise ConfigError("--heldout", heldout, ", ".join(inputs.splits.heldout))
    opts = s.tools
    base, im, im_tag = base_and_imatrix(lc, inputs, out_dir, s.outtype, opts)
    rows_len, numels = gguf_shapes(base)
    total_weights = sum(numels.values())
    logits, base_ppl, ppl_tag = heldout_reference(lc, inputs, out_dir, base, heldout, opts)
    rows = [make_row(s.outtype.upper(), "base", s.outtype, None, base, total_weights, base_ppl)]

    for i, mix in enumerate(s.mixes, 1):
        log.info("uniform mix %d/%d: %s", i, len(s.mixes), mix)
        path = base.parent / f"{inputs.model_name}-{mix}-im{im_tag}.gguf"
        q = run.quantize(lc, base, path, mix, im, opts)
        rows.append(make_row(mix, "uniform", mix, q, path, total_weights, _kld(lc, path, logits, ppl_tag, opts)))
    uniform = [r for r in rows if r.kind == "uniform"]

    for i, p in enumerate(inputs.plans, 1):
        rows.append(_amq_row(lc, p, i, len(inputs.plans), inputs, base, im, im_tag, logits, ppl_tag, rows_len, numels, total_weights, uniform, s))
    if s.speed:  # every GGUF in one llama-bench run, so the ratios compare like with like
        speeds = run.bench(ensure_tool(lc, "llama-bench"), [Path(r.path) for r in rows], opts, out_dir / "bench" / "llama-bench.log")
        for r in rows:
            r.speed = dataclasses.asdict(speeds[r.path]) if r.path in speeds else None
    protocol: dict[str, Any] = {
        "model": inputs.model_name,
        "model_dir": str(inputs.model_dir),
        "run_dir": str(inputs.run_dir) if inputs.run_dir else None,
        "llama_cpp": lc.version,
        "outtype": s.outtype,
        "heldout": heldout,
        "ctx": opts.ctx,
        "chunks": opts.chunks or "all",
        "ppl_tokens": f"{base_ppl.tokens} tokens read, the second half of each {opts.ctx}-token chunk scored" if base_ppl.tokens else "the whole text",
        "imatrix": f"{opts.imatrix_chunks or 'all'} chunks of {opts.ctx} tokens",
        "threads": opts.threads,
        "speed": run.bench_protocol(opts, next((r.speed["cpu"] for r in rows if r.speed), "?"), "every GGUF") if s.speed else None,
        "bits_convention_amq": CONVENTION_WITH_META,
        "bpw": "file bytes x 8 / all weights of the unquantized model (embeddings included); bpw (linears): tensor bytes of the decoder linears x 8 / their weights",
        "minutes": round((time.perf_counter() - t0) / 60, 1),
    }
    return write_report(out_dir, rows, protocol)


def kld_log(path: Path, ppl_tag: str) -> Path:
    """Where a GGUF's perplexity and KLD against the base logits `ppl_tag` are logged: beside it (reused while it holds the result)."""
    return path.with_name(f"{path.stem}.{ppl_tag}.kld.log")


def _kld(lc: LlamaCpp, path: Path, logits: Path, ppl_tag: str, opts: run.ToolOptions) -> run.Perplexity:
    return run.kl_divergence(lc, path, logits, opts, log_path=kld_log(path, ppl_tag))


def _amq_row(
    lc: LlamaCpp,
    p: Plan,
    i: int,
    n: int,
    inputs: Inputs,
    base: Path,
    im: Path,
    im_tag: str,
    logits: Path,
    ppl_tag: str,
    rows_len: dict[str, int],
    numels: dict[str, int],
    total_weights: int,
    uniform: list[Row],
    s: Settings,
) -> Row:
    """Quantize and measure one amq plan on top of the nearest uniform mix."""
    try:
        choices = gguf_plan.plan(p.config, rows_len)
    except ConfigError as exc:
        raise ConfigError("path", f"{p.source}: {exc.problem}", exc.valid) from None
    planned = gguf_plan.planned_bpw(choices, numels)
    mix = s.base_mix or _pick_base_mix(planned, uniform)
    substituted = [c for c in choices if c.substituted]
    log.info(
        "amq plan %d/%d: %s, %d linears, planned %.3f bpw over them; %d take another type than their width's K-quant (row length); rest as %s",
        i, n, p.label, len(choices), planned, len(substituted), mix,
    )  # fmt: skip
    path = base.parent / f"{inputs.model_name}-amq-{p.label}-on-{mix}-im{im_tag}.gguf"
    q = run.quantize(lc, base, path, mix, im, s.tools, {c.tensor: c.ggml_type for c in choices})
    asked = {c.tensor: c.ggml_type for c in choices}
    differs = {t: (asked[t], q.types.get(t)) for t in asked if q.types.get(t) != asked[t]}
    if differs:
        log.warning("llama-quantize wrote %d amq tensors in another type than planned, e.g. %s", len(differs), next(iter(differs.items())))
    module_numels: dict[str, float] = {}  # a block's experts share their fused tensors' weights
    for c in choices:
        for m in c.modules:
            module_numels[m] = module_numels.get(m, 0) + numels[c.tensor] / len(c.modules)
    plan_info = {
        "target": p.label,
        "source": str(p.source),
        "amq_avg_bits": round(average_bits(p.config.bits, module_numels, p.config.group_size), 4),
        "amq_group_size": p.config.group_size,
        "amq_widths": dict(sorted((str(b), sum(1 for c in choices if c.bits == b)) for b in {c.bits for c in choices})),
        "planned_bpw_linears": round(planned, 4),
        "substituted_for_row_length": {
            f"{c.bits}-bit {c.preferred}->{c.ggml_type}": sum(1 for d in substituted if (d.bits, d.ggml_type) == (c.bits, c.ggml_type)) for c in substituted
        },
        "written_other_than_planned": len(differs),
    }
    return make_row(p.label, "amq", mix, q, path, total_weights, _kld(lc, path, logits, ppl_tag, s.tools), plan_info)
