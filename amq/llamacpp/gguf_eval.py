"""What an exported GGUF is worth, as llama.cpp measures it: `eval.json` and `README.md` beside it.

llama.cpp quantizes the plan itself (its block types, its imatrix), so the GGUF's quality is not the
`eval.json` of amq's model directory: it is measured here with llama.cpp's own tools. Every file is
scored by `llama-perplexity --kl-divergence` on every held-out text of the run against the
unquantized GGUF's logits (saved once per text in the run's `llama_cpp/logits/`, shared with
scripts/llama_cpp.py), and optionally timed by one llama-bench run beside the unquantized GGUF.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from amq.io import atomic_write_json, atomic_write_text
from amq.llamacpp import run
from amq.llamacpp.build import LlamaCpp, ensure_tool
from amq.llamacpp.inputs import Inputs, Plan
from amq.llamacpp.pipeline import heldout_reference, kld_log
from amq.llamacpp.report import fmt_or_dash

log = logging.getLogger(__name__)

EVAL_FILE = "eval.json"  # <model dir>/gguf/eval.json: llama.cpp's held-out measurements of the file
CARD_FILE = "README.md"  # <model dir>/gguf/README.md: how to run the file, and eval.json as a table
DEFAULT_EVAL_CHUNKS = 8  # chunks of --ctx tokens per held-out text: an 8-chunk pass takes about 7 s for SmolLM2 on 2 cores


@dataclass(frozen=True)
class Made:
    """One GGUF the export wrote: its plan, file, size, how many tensors the plan typed and their bits a weight."""

    plan: Plan
    path: Path
    file_bytes: int
    tensors: int
    bpw_linears: float
    types: tuple[tuple[str, str], ...]  # the planned type of each tensor: equal types, equal files


def evaluate(
    lc: LlamaCpp, inputs: Inputs, work: Path, base: Path, made: list[Made], opts: run.ToolOptions, base_mix: str, outtype: str, speed: bool = False
) -> None:
    """Each file's perplexity and KL divergence from the unquantized GGUF on every held-out text,
    as llama-perplexity measures them, into `eval.json` and `README.md` beside it (written
    atomically). The unquantized GGUF's logits are made once per text and reused; a file's own
    measurement is made anew (the export has just replaced the file), once per distinct file.
    `base_mix` and `outtype` are recorded: how the file and the unquantized GGUF were made."""
    refs = {name: heldout_reference(lc, inputs, work, base, name, opts) for name in inputs.splits.heldout}
    done: dict[tuple, tuple[str, dict]] = {}  # two targets whose searches picked one configuration give one file
    records: list[tuple[Made, dict]] = []
    for m in made:
        if m.types in done:
            label, measured = done[m.types]
            log.info("%s: the same tensor types as %s, so the same file: its measurement", m.plan.label, label)
        else:
            measured = {name: _heldout(lc, m.path, ref, opts) for name, ref in refs.items()}
            done[m.types] = (m.plan.label, measured)
        records.append((m, measured))
    speeds = _speeds(lc, work, base, made, opts) if speed else {}
    speed_protocol = run.bench_protocol(opts, next(iter(speeds.values()))["cpu"], "the files and the unquantized GGUF") if speeds else None
    for m, measured in records:
        record = _record(m, measured, speeds.get(str(m.path)), inputs, lc, base, opts, base_mix, outtype, speed_protocol)
        atomic_write_json(m.path.parent / EVAL_FILE, record)
        atomic_write_text(m.path.parent / CARD_FILE, render_card(record))
        log.info(
            "%s: %s", m.plan.label,
            "; ".join(f"{n} perplexity {v['perplexity']:.3f} (unquantized GGUF {v['unquantized_perplexity']:.3f}), KLD {fmt_or_dash(v['kld'], '.4f')}" for n, v in measured.items()),
        )  # fmt: skip


def _heldout(lc: LlamaCpp, path: Path, ref: tuple[Path, run.Perplexity, str], opts: run.ToolOptions) -> dict:
    """One file's perplexity and KL divergence on one held-out text, against `ref` (`heldout_reference`)."""
    logits, base_ppl, tag = ref
    log_path = kld_log(path, tag)
    log_path.unlink(missing_ok=True)  # a measurement of the file this export replaced
    r = run.kl_divergence(lc, path, logits, opts, log_path=log_path)
    return {
        "perplexity": r.ppl, "perplexity_err": r.ppl_err, "unquantized_perplexity": base_ppl.ppl,
        "kld": r.kld, "kld_err": r.kld_err, "same_top_pct": r.same_top, "kld_99pct": r.kld_99, "tokens_read": r.tokens,
    }  # fmt: skip


def _record(
    m: Made,
    measured: dict,
    speed: dict | None,
    inputs: Inputs,
    lc: LlamaCpp,
    base: Path,
    opts: run.ToolOptions,
    base_mix: str,
    outtype: str,
    speed_protocol: str | None,
) -> dict:
    """What `eval.json` holds for one file: the file, what llama.cpp measured, and how."""
    return {
        "gguf": m.path.name,
        "target": m.plan.label,
        "model": inputs.model_name,
        "file_mib": round(m.file_bytes / 2**20, 2),
        "planned_tensors": m.tensors,
        "bpw_linears": round(m.bpw_linears, 4),
        "base_mix": base_mix,
        "llama_cpp": lc.version,
        "heldout": measured,
        "speed": speed,
        "protocol": {
            "tool": "llama-perplexity --kl-divergence, against the unquantized GGUF's logits on the same tokens",
            "unquantized": f"{base.name} (llama.cpp's convert_hf_to_gguf.py, {outtype})",
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
    timed: dict[tuple, Path] = {}  # one file of each content: equal types, equal files
    for m in made:
        timed.setdefault(m.types, m.path)
    measured = run.bench(ensure_tool(lc, "llama-bench"), [base, *timed.values()], opts, work / "bench" / "export-llama-bench.log")
    ref = measured.get(str(base))
    out = {}
    for m in made:
        sp = measured.get(str(timed[m.types]))
        if sp is None:
            continue
        out[str(m.path)] = {
            "decode_tps": sp.decode, "decode_sd": sp.decode_sd, "prefill_tps": sp.prefill, "prefill_sd": sp.prefill_sd, "cpu": sp.cpu,
            "unquantized_decode_tps": ref.decode if ref else None, "unquantized_prefill_tps": ref.prefill if ref else None,
            "decode_vs_unquantized": round(sp.decode / ref.decode, 3) if ref else None,
        }  # fmt: skip
    return out


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
