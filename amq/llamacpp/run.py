"""Run llama.cpp's convert script and tools, and read back what they did.

Everything is a subprocess: the convert script from the cached llama.cpp source (with its own
gguf-py, which knows the newest types), and the built `llama-imatrix`, `llama-quantize` and
`llama-perplexity`. Their logs are kept next to their outputs; the numbers we report (types
actually written, fallbacks, sizes, perplexity, KL divergence) are parsed from those logs, so the
table shows what llama.cpp did, not what we asked for. Every file is written under a temporary
name and renamed when the tool succeeded.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from amq.errors import ConfigError
from amq.llamacpp.build import LlamaCpp

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ToolOptions:
    """What every llama.cpp run shares: threads, context length and how many chunks to read."""

    threads: int = 2
    ctx: int = 512
    chunks: int | None = None  # perplexity/KLD chunks of `ctx` tokens (None: the whole text)
    imatrix_chunks: int | None = None

    def check(self) -> None:
        """Each count positive (None, the whole text, for the chunks), named by its command-line option."""
        for name, value in (("--ctx", self.ctx), ("--threads", self.threads), ("--chunks", self.chunks or 1), ("--imatrix-chunks", self.imatrix_chunks or 1)):
            if value < 1:
                raise ConfigError(name, str(value), "a positive integer")


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _run(cmd: Sequence[str | Path], log_path: Path, what: str, env: Mapping[str, str] | None = None, failed_log: Path | None = None) -> str:
    """Run `cmd`, keeping its combined output in `log_path`; a failure is a one-line ConfigError
    naming the log (moved to `failed_log` first when given: `log_path` is then a temporary file)."""
    t0 = time.perf_counter()
    argv = [str(c) for c in cmd]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as fh:  # streamed: `tail -f` the log to follow a long run
        fh.write(f"$ {' '.join(argv)}\n")
        fh.flush()
        rc = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, check=False).returncode
    output = log_path.read_text(encoding="utf-8", errors="replace").split("\n", 1)[-1]
    if rc != 0:
        if failed_log is not None:
            os.replace(log_path, failed_log)
            log_path = failed_log
        lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
        last = next((ln for ln in reversed(lines) if re.search(r"error|exception|failed", ln, re.I)), lines[-1] if lines else "")
        raise ConfigError(
            what, f"{_exit_status(rc)} (log {log_path}): {last[:240]}", "see the log; the model, the text and the llama.cpp build must fit together"
        )
    log.info("%s: done in %.1f s", what, time.perf_counter() - t0)
    return output


def _exit_status(rc: int) -> str:
    """'exited 1', or the signal that killed the tool (an illegal instruction: a build this CPU cannot run)."""
    if rc >= 0:
        return f"exited {rc}"
    try:
        name = signal.Signals(-rc).name
    except ValueError:
        return f"killed by signal {-rc}"
    hint = " (an instruction this CPU does not run: rebuild llama.cpp on this machine)" if name == "SIGILL" else ""
    return f"killed by {name}{hint}"


CONVERTER_MODULES = ("sentencepiece",)  # imported by convert_hf_to_gguf.py beyond amq's own dependencies


def require_converter_modules() -> None:
    """Refuse at once (not after a build) when the convert script's Python imports are missing."""
    missing = [m for m in CONVERTER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            "python packages",
            f"{', '.join(missing)} not installed (llama.cpp's convert_hf_to_gguf.py imports it)",
            "pip install -c constraints.txt -e '.[llamacpp]'",
        )


def convert(lc: LlamaCpp, model_dir: Path, out: Path, outtype: str = "f32") -> Path:
    """The unquantized transformers checkpoint as a GGUF (llama.cpp's convert_hf_to_gguf.py)."""
    if out.is_file():
        log.info("convert: reusing %s", out)
        return out
    log.info("convert: %s -> %s (%s)", model_dir, out.name, outtype)
    tmp = _tmp(out)
    try:
        _run([sys.executable, lc.convert_script, model_dir, "--outfile", tmp, "--outtype", outtype], out.with_suffix(".convert.log"), "convert_hf_to_gguf.py")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def imatrix(lc: LlamaCpp, model: Path, text: Path, out: Path, opts: ToolOptions) -> Path:
    """An importance matrix of `model` on `text` (llama-imatrix), for every quantization after."""
    if out.is_file():
        log.info("imatrix: reusing %s", out)
        return out
    log.info("imatrix: %s on %s (%s chunks of %d tokens)", model.name, text.name, opts.imatrix_chunks or "all", opts.ctx)
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp{out.suffix}")  # llama-imatrix picks its format from the extension
    cmd: list[str | Path] = [lc.tool("llama-imatrix"), "-m", model, "-f", text, "-o", tmp, "-c", str(opts.ctx), "-t", str(opts.threads), "--no-ppl"]
    if opts.imatrix_chunks:
        cmd += ["--chunks", str(opts.imatrix_chunks)]
    try:
        _run(cmd, out.with_suffix(".log"), "llama-imatrix")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


@dataclass
class QuantizeResult:
    """What llama-quantize actually wrote: per tensor its type and size, and its fallbacks."""

    path: Path
    types: dict[str, str] = field(default_factory=dict)  # tensor -> ggml type written
    bytes: dict[str, float] = field(default_factory=dict)  # tensor -> bytes written (from MiB, 2 decimals)
    numels: dict[str, int] = field(default_factory=dict)
    fallbacks: dict[str, tuple[str, str]] = field(default_factory=dict)  # tensor -> (asked, used)
    file_bytes: int = 0


_TENSOR = re.compile(r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+-\s+\[([^\]]*)\],\s+type =\s*(\w+),\s*(?:converting to (\w+) \.\. )?")
_SIZE = re.compile(r"size =\s*([\d.]+) MiB(?:\s*->\s*([\d.]+) MiB)?")
_FALLBACK = re.compile(r"warning:\s+(\S+)\s+- ncols\s+\d+ not divisible by\s+\d+ \(required for type\s+(\w+)\).*?-> falling back to\s+(\w+)")


def parse_quantize_log(text: str, path: Path) -> QuantizeResult:
    """Types, sizes and fallbacks per tensor from llama-quantize's output."""
    res = QuantizeResult(path)
    current: str | None = None
    for line in text.splitlines():
        if m := _FALLBACK.search(line):
            res.fallbacks[m.group(1)] = (m.group(2), m.group(3))
        if m := _TENSOR.search(line):
            current = m.group(1)
            dims = [int(d) for d in m.group(2).replace(" ", "").split(",") if d]
            numel = 1
            for d in dims:
                numel *= d
            res.numels[current] = numel
            res.types[current] = m.group(4) or m.group(3)
        if current and (s := _SIZE.search(line)):
            res.bytes[current] = float(s.group(2) or s.group(1)) * 2**20
            current = None
    return res


def quantize(
    lc: LlamaCpp,
    model: Path,
    out: Path,
    ftype: str,
    imatrix_file: Path | None,
    opts: ToolOptions,
    tensor_types: Mapping[str, str] | None = None,
    reuse: bool = True,
) -> QuantizeResult:
    """llama-quantize `model` to `ftype` (the type of every tensor not in `tensor_types`); with
    `reuse`, an `out` whose log is there is read back instead (the benchmark's names say what made it)."""
    log_path = out.with_suffix(".quantize.log")
    if reuse and out.is_file() and log_path.is_file():
        log.info("quantize: reusing %s", out)
        res = parse_quantize_log(log_path.read_text(encoding="utf-8"), out)
    else:
        log.info("quantize: %s -> %s (%s%s)", model.name, out.name, ftype, f", {len(tensor_types)} per-tensor types" if tensor_types else "")
        tmp = _tmp(out)
        cmd: list[str | Path] = [lc.tool("llama-quantize")]
        if imatrix_file is not None:
            cmd += ["--imatrix", imatrix_file]
        if tensor_types:
            from amq.llamacpp.gguf_plan import pattern

            type_file = out.with_suffix(".tensor_types.txt")  # --tensor-type-file: whitespace-separated PATTERN=TYPE, no comments
            type_file.write_text("".join(f"{pattern(t)}={ty}\n" for t, ty in tensor_types.items()), encoding="utf-8")
            cmd += ["--tensor-type-file", type_file]
        cmd += [model, tmp, ftype, str(opts.threads)]
        try:
            text = _run(cmd, log_path, "llama-quantize")
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        res = parse_quantize_log(text, out)
    res.file_bytes = out.stat().st_size
    if not res.types:
        raise ConfigError("llama-quantize", f"its log {log_path} lists no tensors", "a llama.cpp build whose quantize log prints one line per tensor")
    return res


@dataclass(frozen=True)
class Perplexity:
    """llama-perplexity's numbers for one model (KLD fields are None for the base model)."""

    ppl: float
    ppl_err: float
    kld: float | None = None
    kld_err: float | None = None
    same_top: float | None = None  # % of tokens whose most likely next token agrees with the base
    kld_99: float | None = None
    tokens: int | None = None


def _num(pattern: str, text: str) -> tuple[float, float] | None:
    m = re.search(pattern, text)
    return (float(m.group(1)), float(m.group(2))) if m else None


def parse_perplexity_log(text: str, source: str = "the text") -> Perplexity:
    """`Final estimate: PPL = ...` (base run) or the `Mean PPL(Q)` / `Mean KLD` block (--kl-divergence)."""
    short = re.search(r"you need at least (\d+) tokens to evaluate perplexity with a context of (\d+)", text)
    if short:  # llama-perplexity says so and exits 0
        only = re.search(r"tokenizes to only (\d+) tokens", text)
        have = int(only.group(1)) if only else None
        raise ConfigError(
            "--ctx",
            f"{short.group(2)} tokens a chunk, but {source} holds {have if have is not None else 'too few'} tokens; llama-perplexity needs at least {short.group(1)} (two chunks)",
            f"--ctx {have // 2} or less" if have and have >= 32 else "a longer held-out text",
        )
    pm = "(?:±|\\+/-)"
    q = _num(rf"Mean PPL\(Q\)\s*:\s*([\d.]+)\s*{pm}\s*([\d.]+)", text) or _num(rf"Final estimate: PPL = ([\d.]+) {pm} ([\d.]+)", text)
    if q is None:
        raise ConfigError("llama-perplexity", "its output holds no perplexity", "a llama.cpp build whose llama-perplexity prints `Final estimate: PPL`")
    kld = _num(rf"Mean\s+KLD:\s*([-\d.]+)\s*{pm}\s*([\d.]+)", text)
    top = _num(rf"Same top p:\s*([\d.]+)\s*{pm}\s*([\d.]+)", text)
    k99 = re.search(r"99\.0%\s+KLD:\s*([-\d.]+)", text)
    chunks = re.search(r"(?:computing|calculating perplexity) over (\d+) chunks, n_ctx=(\d+)", text)
    return Perplexity(
        ppl=q[0], ppl_err=q[1], kld=kld[0] if kld else None, kld_err=kld[1] if kld else None, same_top=top[0] if top else None,
        kld_99=float(k99.group(1)) if k99 else None, tokens=int(chunks.group(1)) * int(chunks.group(2)) if chunks else None,
    )  # fmt: skip


def base_logits(lc: LlamaCpp, model: Path, text: Path, logits: Path, opts: ToolOptions) -> Perplexity:
    """Perplexity of the unquantized model on `text`, saving its logits for the KLD runs."""
    log_path = logits.with_suffix(".log")
    if logits.is_file() and log_path.is_file():
        log.info("perplexity: reusing the base logits %s", logits)
        return parse_perplexity_log(log_path.read_text(encoding="utf-8"))
    log.info("perplexity: base model %s on %s (%s chunks of %d tokens), saving logits", model.name, text.name, opts.chunks or "all", opts.ctx)
    tmp = _tmp(logits)
    cmd: list[str | Path] = [lc.tool("llama-perplexity"), "-m", model, "-f", text, "--kl-divergence-base", tmp, "-c", str(opts.ctx), "-t", str(opts.threads)]
    if opts.chunks:
        cmd += ["--chunks", str(opts.chunks)]
    try:
        out = _run(cmd, log_path, "llama-perplexity")
        result = parse_perplexity_log(out, text.name)  # before the logits are published: a run that measured nothing leaves none
        os.replace(tmp, logits)
    finally:
        tmp.unlink(missing_ok=True)
    return result


def kl_divergence(lc: LlamaCpp, model: Path, logits: Path, opts: ToolOptions, log_path: Path | None = None) -> Perplexity:
    """Perplexity of a quantized model and its KL divergence from the base logits (same tokens);
    the log (default `<model>.kld.log`) is kept, and reused when it already holds the result."""
    log_path = log_path or model.with_suffix(".kld.log")
    if log_path.is_file():
        try:
            return parse_perplexity_log(log_path.read_text(encoding="utf-8"))
        except ConfigError:
            pass  # an interrupted earlier run: measure again
    log.info("perplexity: %s against the base logits %s", model.name, logits.name)
    cmd: list[str | Path] = [
        lc.tool("llama-perplexity"),
        "-m",
        model,
        "--kl-divergence-base",
        logits,
        "--kl-divergence",
        "-c",
        str(opts.ctx),
        "-t",
        str(opts.threads),
    ]
    if opts.chunks:
        cmd += ["--chunks", str(opts.chunks)]
    tmp_log = _tmp(log_path)
    try:
        out = _run(cmd, tmp_log, "llama-perplexity --kl-divergence", failed_log=log_path.with_suffix(".failed.log"))
        result = parse_perplexity_log(out)
        os.replace(tmp_log, log_path)
    finally:
        tmp_log.unlink(missing_ok=True)
    return result


@dataclass(frozen=True)
class Speed:
    """llama-bench's tokens/s for one GGUF (mean and standard deviation over its repetitions)."""

    decode: float
    decode_sd: float
    prefill: float
    prefill_sd: float
    cpu: str = ""  # llama-bench's cpu_info


def parse_bench_json(text: str) -> dict[str, Speed]:
    """Model file -> Speed from `llama-bench -o json` (one record per model and test: n_gen for
    decode, n_prompt for prefill)."""
    import json

    by_model: dict[str, dict[str, tuple[float, float]]] = {}
    cpu = {}
    for rec in json.loads(text):
        test = "decode" if rec.get("n_gen", 0) > 0 else "prefill"
        by_model.setdefault(rec["model_filename"], {})[test] = (float(rec["avg_ts"]), float(rec["stddev_ts"]))
        cpu[rec["model_filename"]] = str(rec.get("cpu_info", ""))
    return {m: Speed(*t["decode"], *t["prefill"], cpu[m]) for m, t in by_model.items() if {"decode", "prefill"} <= t.keys()}


BENCH = {"decode_tokens": 128, "prompt_tokens": 512, "reps": 3}  # llama-bench's -n, -p, -r by default


def bench_protocol(opts: ToolOptions, cpu: str, what: str) -> str:
    """How `bench` timed `what` (its arguments and the CPU llama-bench reported), for a report's protocol."""
    b = BENCH
    return f"llama-bench -n {b['decode_tokens']} -p {b['prompt_tokens']} -r {b['reps']} -t {opts.threads}, {what} in one run, on {cpu}"


def bench(
    tool: Path,
    models: Sequence[Path],
    opts: ToolOptions,
    log_path: Path,
    decode_tokens: int = BENCH["decode_tokens"],
    prompt_tokens: int = BENCH["prompt_tokens"],
    reps: int = BENCH["reps"],
) -> dict[str, Speed]:
    """Decode and prefill tokens/s of every model, side by side in one llama-bench run (same threads,
    same moment of the machine); keyed by the model's path as given. Its JSON (stdout) is kept as
    `log_path` with `.json`, its log (stderr) as `log_path`."""
    argv = [str(tool)]
    for m in models:
        argv += ["-m", str(m)]
    argv += ["-p", str(prompt_tokens), "-n", str(decode_tokens), "-t", str(opts.threads), "-r", str(reps), "-o", "json"]
    log.info("llama-bench: %d models, decode %d and prefill %d tokens, %d repetitions", len(models), decode_tokens, prompt_tokens, reps)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as fh:
        fh.write(f"$ {' '.join(argv)}\n")
        fh.flush()
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=fh, text=True, check=False)
    if proc.returncode != 0:
        raise ConfigError(
            "llama-bench", f"{_exit_status(proc.returncode)} (log {log_path})", "see the log; the models and the llama.cpp build must fit together"
        )
    json_path = log_path.with_suffix(".json")
    json_path.write_text(proc.stdout, encoding="utf-8")
    try:
        return parse_bench_json(proc.stdout)
    except (ValueError, KeyError) as exc:
        raise ConfigError(
            "llama-bench", f"its output {json_path} is not the JSON list -o json prints ({exc})", "a llama.cpp build whose llama-bench takes -o json"
        ) from None
