"""The comparison table: amq's mixed GGUFs against llama.cpp's uniform mixes of about the same size.

Sizes are the GGUF files' bytes (MiB) and llama.cpp's own bits per weight (tensor bytes over all
weights, embeddings included), plus bits per weight over the decoder linears alone (the part the
search allocates). Quality is what llama-perplexity measures: held-out perplexity and the KL
divergence from the unquantized GGUF on the same tokens. Each amq model is paired with the
uniform mixes just below and just above it in file size.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from amq.io import atomic_write_json, atomic_write_text
from amq.llamacpp.gguf_plan import EXPERT_ROLES, ROLES
from amq.llamacpp.run import Perplexity, QuantizeResult

_LINEAR_ROLES = tuple(f".{r}.weight" for r in (*ROLES.values(), *(t for ts in EXPERT_ROLES.values() for t in ts)))


def is_linear(tensor: str) -> bool:
    return tensor.startswith("blk.") and tensor.endswith(_LINEAR_ROLES)


@dataclass
class Row:
    """One GGUF of the table."""

    label: str
    kind: str  # base | uniform | amq
    ftype: str  # llama-quantize's type argument (for amq: the mix the non-linear tensors follow)
    file_mib: float
    bpw: float  # file bytes * 8 / all weights (the unquantized model's parameter count)
    bpw_linears: float | None
    ppl: float
    ppl_err: float
    kld: float | None
    kld_err: float | None
    same_top: float | None
    kld_99: float | None
    linear_types: dict[str, int] = field(default_factory=dict)  # ggml type -> number of decoder linears written in it
    fallbacks: int = 0  # tensors llama-quantize gave another type than asked (row length)
    plan: dict[str, Any] | None = None  # amq only: target, planned bpw, substitutions we made
    path: str = ""
    speed: dict[str, float] | None = None  # llama-bench tokens/s (run.Speed's fields), with --speed


def linear_summary(q: QuantizeResult) -> tuple[float | None, dict[str, int]]:
    """Bits per weight over the decoder linears and how many were written in each type."""
    names = [t for t in q.types if is_linear(t)]
    numel = sum(q.numels[t] for t in names)
    bytes_ = sum(q.bytes.get(t, 0.0) for t in names)
    bpw = 8 * bytes_ / numel if numel else None
    return bpw, dict(sorted(Counter(q.types[t] for t in names).items()))


def make_row(label: str, kind: str, ftype: str, q: QuantizeResult | None, path: Path, total_weights: int, ppl: Perplexity, plan: Mapping | None = None) -> Row:
    size = path.stat().st_size
    bpw_lin, types = linear_summary(q) if q is not None else (None, {})
    return Row(
        label=label, kind=kind, ftype=ftype, file_mib=size / 2**20, bpw=8 * size / total_weights, bpw_linears=bpw_lin,
        ppl=ppl.ppl, ppl_err=ppl.ppl_err, kld=ppl.kld, kld_err=ppl.kld_err, same_top=ppl.same_top, kld_99=ppl.kld_99,
        linear_types=types, fallbacks=len(q.fallbacks) if q is not None else 0, plan=dict(plan) if plan else None, path=str(path),
    )  # fmt: skip


def neighbours(row: Row, uniforms: list[Row]) -> list[Row]:
    """The uniform mixes just below and just above `row` in file size (one of each where they exist)."""
    below = [u for u in uniforms if u.file_mib <= row.file_mib]
    above = [u for u in uniforms if u.file_mib > row.file_mib]
    return ([max(below, key=lambda u: u.file_mib)] if below else []) + ([min(above, key=lambda u: u.file_mib)] if above else [])


def fmt_or_dash(x: float | None, fmt: str) -> str:
    """`x` formatted, or '-' where it was not measured."""
    return "-" if x is None else format(x, fmt)


def _types(row: Row) -> str:
    return ", ".join(f"{t} x{n}" for t, n in row.linear_types.items()) or "-"


def _speed(row: Row) -> str:
    s = row.speed
    return f" {s['decode']:.1f} ± {s['decode_sd']:.1f} | {s['prefill']:.0f} ± {s['prefill_sd']:.0f} |" if s else " - | - |"


def render_markdown(rows: list[Row], protocol: Mapping[str, Any]) -> str:
    """All GGUFs by size, then per amq model its uniform neighbours in file size."""
    timed = any(r.speed for r in rows)
    head = "| GGUF | file MiB | bpw (file) | bpw (linears) | PPL | KLD | KLD p99 | same top % | decoder linear types | fallbacks |"
    head += " decode t/s | prefill t/s |" if timed else ""
    lines = [
        f"llama.cpp on {protocol['model']}: held-out `{protocol['heldout']}`, {protocol['ppl_tokens']} (`--chunks {protocol['chunks']}`, `-c {protocol['ctx']}`); "
        f"KLD against the unquantized {protocol['outtype']} GGUF on the same tokens; imatrix from the calibration split ({protocol['imatrix']})."
        + (f" Tokens/s: {protocol['speed']}." if protocol.get("speed") else ""),
        "",
        head,
        "|" + " --- |" * (head.count("|") - 1),
    ]
    for r in sorted(rows, key=lambda r: r.file_mib):
        name = f"**amq {r.label}** (on {r.ftype})" if r.kind == "amq" else (f"{r.label} (unquantized)" if r.kind == "base" else r.label)
        lines.append(
            f"| {name} | {r.file_mib:.1f} | {r.bpw:.2f} | {fmt_or_dash(r.bpw_linears, '.2f')} | {r.ppl:.3f} ± {r.ppl_err:.3f} | "
            f"{fmt_or_dash(r.kld, '.4f')}{'' if r.kld_err is None else f' ± {r.kld_err:.4f}'} | {fmt_or_dash(r.kld_99, '.3f')} | {fmt_or_dash(r.same_top, '.1f')} | {_types(r)} | {r.fallbacks} |"
            + (_speed(r) if timed else "")
        )
    uniforms = [r for r in rows if r.kind == "uniform"]
    amq = [r for r in rows if r.kind == "amq"]
    if amq:
        lines += ["", "At about the same file size:", ""]
        for r in amq:
            pair = "; ".join(f"{u.label} {u.file_mib:.1f} MiB, KLD {fmt_or_dash(u.kld, '.4f')}, PPL {u.ppl:.3f}" for u in neighbours(r, uniforms))
            lines.append(f"- amq {r.label}: {r.file_mib:.1f} MiB, KLD {fmt_or_dash(r.kld, '.4f')}, PPL {r.ppl:.3f} | {pair or 'no uniform mix measured'}")
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, rows: list[Row], protocol: Mapping[str, Any]) -> tuple[Path, Path]:
    """llama_cpp.md and llama_cpp.json in `out_dir`, each written atomically."""
    md, js = out_dir / "llama_cpp.md", out_dir / "llama_cpp.json"
    uniforms = [r for r in rows if r.kind == "uniform"]
    pairs = {r.label: [u.label for u in neighbours(r, uniforms)] for r in rows if r.kind == "amq"}
    atomic_write_json(js, {"protocol": dict(protocol), "rows": [asdict(r) for r in rows], "same_size_uniform": pairs})
    atomic_write_text(md, render_markdown(rows, protocol))
    return md, js
