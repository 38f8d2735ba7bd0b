"""`amq-export PATH [--format compressed-tensors] [--out DIR]`: standard checkpoints from models amq
already exported, without searching or quantizing again.

PATH is a model directory (`<run>/models/<target>`, or one under `<run>/finalized/<time>/models/`)
or a run directory (every model under its `models/`). Each model gets `<model dir>/<format>/`
(or `--out`, for a single model), written atomically: a failure leaves no half-written folder.
The finalize stage writes the same checkpoints itself (`finalize.formats`); this is for runs made
before, or without them.
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
        raise ConfigError("--format", f"unknown format {fmt!r}", ", ".join(FORMATS))
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


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="amq-export", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("path", type=Path, help="an amq model directory or a run directory")
    ap.add_argument("--format", default=FORMATS[0], help=f"one of: {', '.join(FORMATS)} (default {FORMATS[0]})")
    ap.add_argument("--out", type=Path, default=None, help="where to write (a single model only; default <model dir>/<format>)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s", stream=sys.stderr)
    try:
        export(args.path, args.format, args.out)
    except ConfigError as exc:
        log.error("%s", exc)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
