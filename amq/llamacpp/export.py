"""A GGUF to ship for each amq model: the search's per-tensor plan, quantized by llama.cpp itself.

What `amq-export --format gguf` runs, per model directory: the unquantized model converted once
(llama.cpp's convert_hf_to_gguf.py), an importance matrix on amq's calibration split, then
llama-quantize with the plan's per-tensor types (`gguf_plan`: each width's K-quant where a row
allows it). The tensors the search does not touch (token embedding, output, norms) take the types
of one of llama.cpp's mixes, `base_mix` (Q4_K_M by default, the mix llama.cpp's users most often
pick). Each file is then measured as llama.cpp measures it (`evaluate`): held-out perplexity and
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
from amq.io import atomic_write_json, atomic_write_text
from amq.llamacpp import gguf_plan, run
from amq.llamacpp.build import LlamaCpp, ensure_tool
from amq.llamacpp.inputs import Inputs, Plan, require_architecture
from amq.llamacpp.pipeline import UNIFORM_MIXES, base_and_imatrix, check_base, gguf_shapes, heldout_reference
from amq.llamacpp.report import fmt_or_dash

log = logging.getLogger(__name__)

DEFAULT_BASE_MIX = "Q4_K_M"
GGUF_DIR = "gguf"  # <model dir>/gguf/, beside <model dir>/compressed-tensors/
EVAL_FILE = "eval.json"  # <model dir>/gguf/eval.json: llama.cpp's held-out measurements of the file
CARD_FILE = "README.md"  # <model dir>/gguf/README.md: how to run the file, and eval.json as a table
DEFAULT_EVAL_CHUNKS = 8  # chunks of --ctx tokens per held-out text: about 2 s each for SmolLM2 on 2 cores


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
        evaluate(lc, inputs, work, base, written, settings)
    return [m.path for m in written]


@dataclass(frozen=True)
class Made:
    """One GGUF the export wrote: its plan, file, size, how many tensors the plan typed and their bits a weight."""

    plan: Plan
    path: Path
    file_bytes: int
    tensors: int
    bpw_linears: float
    types: tuple[tuple[str, str], ...]  # the planned type of each tensor: equal types, equal files


def evaluate(lc: LlamaCpp, inputs: Inputs, work: Path, base: Path, made: list[Made], settings: GgufSettings) -> None:
    """Each file's perplexity and KL divergence from the unquantized GGUF on every held-out text,
    as llama-perplexity measures them, into `eval.json` and `README.md` beside it (written
    atomically). The unquantized GGUF's logits are made once per text and reused; a file's own
    measurement is made anew (the export has just replaced the file), once per distinct file."""
    opts = settings.tools
    refs = {name: heldout_reference(lc, inputs, work, base, name, opts) for name in inputs.splits.heldout}
    done: dict[tuple, tuple[str, dict]] = {}  # two targets whose searches picked one configuration give one file
    records: list[tuple[Made, dict]] = []
    for m in made:
        measured = {}
        if m.types in done:
            label, measured = done[m.types]
            log.info("%s: the same tensor types as %s, so the same file: its measurement", m.plan.label, label)
        for name, (logits, base_ppl, tag) in refs.items():
            if name in measured:
                continue
            log_path = m.path.with_name(f"{m.path.stem}.{tag}.kld.log")
            log_path.unlink(missing_ok=True)
            r = run.kl_divergence(lc, m.path, logits, opts, log_path=log_path)
            measured[name] = {
                "perplexity": r.ppl, "perplexity_err": r.ppl_err, "unquantized_perplexity": base_ppl.ppl,
                "kld": r.kld, "kld_err": r.kld_err, "same_top_pct": r.same_top, "kld_99pct": r.kld_99, "tokens_read": r.tokens,
            }  # fmt: skip
        done.setdefault(m.types, (m.plan.label, measured))
        records.append((m, measured))
    speeds = _speeds(lc, work, base, [m for m, _ in records], opts) if settings.speed else {}
    speed_protocol = _speed_protocol(speeds, opts) if speeds else None
    for m, measured in records:
        record = _record(m, measured, speeds.get(str(m.path)), inputs, lc, base, settings, speed_protocol)
        atomic_write_json(m.path.parent / EVAL_FILE, record)
        atomic_write_text(m.path.parent / CARD_FILE, render_card(record))
        log.info(
            "%s: %s", m.plan.label,
            "; ".join(f"{n} perplexity {v['perplexity']:.3f} (unquantized GGUF {v['unquantized_perplexity']:.3f}), KLD {fmt_or_dash(v['kld'], '.4f')}" for n, v in measured.items()),
        )  # fmt: skip


def _record(m: Made, measured: dict, speed: dict | None, inputs: Inputs, lc: LlamaCpp, base: Path, settings: GgufSettings, speed_protocol: str | None) -> dict:
    """What `eval.json` holds for one file: the file, what llama.cpp measured, and how."""
    opts = settings.tools
    return {
        "gguf": m.path.name,
        "target": m.plan.label,
        "model": inputs.model_name,
        "file_mib": round(m.file_bytes / 2**20, 2),
        "planned_tensors": m.tensors,
        "bpw_linears": round(m.bpw_linears, 4),
        "base_mix": settings.base_mix,
        "llama_cpp": lc.version,
        "heldout": measured,
        "speed": speed,
        "protocol": {
            "tool": "llama-perplexity --kl-divergence, against the unquantized GGUF's logits on the same tokens",
            "unquantized": f"{base.name} (llama.cpp's convert_hf_to_gguf.py, {settings.outtype})",
            "ctx": opts.ctx,
            "chunks": opts.chunks or "all",
            "scored": "the second half of each chunk (llama-perplexity's own windows, not amq's eval.json windows)",
            "imatrix": f"{opts.imatrix_chunks or 'all'} chunks of {opts.ctx} tokens of the calibration split",
            "threads": opts.threads,
            "speed": speed_protocol,
        },
    }


def _speeds(lc: LlamaCpp, work: Path, base: Path, made: list[Made], opts: run.ToolOptions) -> dict[str, dict]:
    """Decode and prefill tokens/s of each file and of the unquantized GGUF, all in one llama-bench
    run (same threads, same moment of the machine), with the ratios to the unquantized one."""
    paths = [base, *dict.fromkeys(m.path for m in made)]
    measured = run.bench(ensure_tool(lc, "llama-bench"), paths, opts, work / "bench" / "export-llama-bench.log")
    ref = measured.get(str(base))
    out = {}
    for m in made:
        sp = measured.get(str(m.path))
        if sp is None:
            continue
        out[str(m.path)] = {
            "decode_tps": sp.decode, "decode_sd": sp.decode_sd, "prefill_tps": sp.prefill, "prefill_sd": sp.prefill_sd, "cpu": sp.cpu,
            "unquantized_decode_tps": ref.decode if ref else None, "unquantized_prefill_tps": ref.prefill if ref else None,
            "decode_vs_unquantized": round(sp.decode / ref.decode, 3) if ref else None,
        }  # fmt: skip
    return out


def _speed_protocol(speeds: dict[str, dict], opts: run.ToolOptions) -> str:
    b = run.BENCH
    cpu = next(iter(speeds.values()))["cpu"]
    return (
        f"llama-bench -n {b['decode_tokens']} -p {b['prompt_tokens']} -r {b['reps']} -t {opts.threads}, the files and the unquantized GGUF in one run, on {cpu}"
    )


def render_card(record: dict) -> str:
    """The GGUF's own README: what it holds, how to run it, and what llama.cpp measured."""
    p = record["protocol"]
    lines = [
        f"# {record['gguf']}",
        "",
        f"amq's {record['target']}-bit plan for `{record['model']}` as a llama.cpp GGUF ({record['file_mib']} MiB): "
        f"{record['planned_tensors']} decoder tensors at the search's widths ({record['bpw_linears']:.2f} bits a weight in "
        f"llama.cpp's block types), the others (embeddings, output, norms) as in `{record['base_mix']}`. Quantized by "
        f"llama.cpp {record['llama_cpp']} with an importance matrix on amq's calibration text.",
        "",
        "```bash",
        f"llama-cli -m {record['gguf']} -p 'Once upon a time'   # or: llama-server -m {record['gguf']}",
        "```",
        "",
        "## Held-out quality, as llama.cpp measures it",
        "",
        "| held-out text | perplexity | unquantized GGUF | KL divergence | same top token | tokens scored |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, v in record["heldout"].items():
        top = "-" if v["same_top_pct"] is None else f"{v['same_top_pct']:.1f}%"
        tokens = v["tokens_read"] // 2 if v["tokens_read"] else "-"
        lines.append(
            f"| {name} | {v['perplexity']:.3f} ± {v['perplexity_err']:.3f} | {v['unquantized_perplexity']:.3f} | {fmt_or_dash(v['kld'], '.4f')} | {top} | {tokens} |"
        )
    sp = record.get("speed")
    if sp:
        ratio = f" ({sp['decode_vs_unquantized']:.2f}x the unquantized GGUF's {sp['unquantized_decode_tps']:.1f})" if sp["decode_vs_unquantized"] else ""
        lines += [
            "",
            f"Speed ({p['speed']}): decode {sp['decode_tps']:.1f} ± {sp['decode_sd']:.1f} tokens/s{ratio}, "
            f"prefill {sp['prefill_tps']:.0f} ± {sp['prefill_sd']:.0f} tokens/s.",
        ]
    lines += [
        "",
        f"`{p['tool']}`; {p['chunks']} chunks of {p['ctx']} tokens, {p['scored']}. Compare these numbers with each other "
        "and with `scripts/llama_cpp.py`'s uniform mixes, not with `../eval.json` (other windows, another runtime). "
        "`eval.json` holds them with the protocol.",
        "",
    ]
    return "\n".join(lines)
