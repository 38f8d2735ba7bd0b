"""Are two run directories the same, apart from timings and paths? File by file, for checking that
a change of code or layout leaves what a run finds untouched (same seed, same thread count).

    python scripts/compare_run_dirs.py RUN_A RUN_B

JSON and JSONL files are compared with every timing or path field left out (keys naming seconds,
time, paths, directories, environment, peak memory); other files byte for byte. Exit status 1 when
anything else differs. config.yaml and the logs name module paths and times, so they are shown but
not counted.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

VOLATILE = re.compile(r"(seconds|_s$|^s$|time|elapsed|peak_rss|dir$|path|started|finished|date|environment)", re.I)
NOT_COUNTED = {"config.yaml", "train_search.log", ".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml"}


def stable(x: Any, roots: tuple[str, ...]) -> Any:
    """`x` without timing and path fields; run directory names replaced by <RUN>."""
    if isinstance(x, dict):
        return {k: stable(v, roots) for k, v in x.items() if not VOLATILE.search(k)}
    if isinstance(x, list):
        return [stable(v, roots) for v in x]
    if isinstance(x, str):
        for r in roots:
            x = x.replace(r, "<RUN>")
    return x


def load(path: Path, roots: tuple[str, ...]) -> Any:
    if path.suffix == ".json":
        return stable(json.loads(path.read_text()), roots)
    if path.suffix == ".jsonl":
        return [stable(json.loads(line), roots) for line in path.read_text().splitlines() if line.strip()]
    text = path.read_bytes()
    for r in roots:
        text = text.replace(r.encode(), b"<RUN>")
    return text


def compare(a: Path, b: Path) -> list[str]:
    """One line per file that differs beyond timings and paths (files present on one side only too)."""
    roots = (str(a), str(b))
    files = {str(p.relative_to(root)) for root in (a, b) for p in root.rglob("*") if p.is_file()}
    out = []
    for f in sorted(files):
        pa, pb = a / f, b / f
        if not (pa.is_file() and pb.is_file()):
            out.append(f"{f}: only in {'A' if pa.is_file() else 'B'}")
        elif pa.read_bytes() != pb.read_bytes() and load(pa, roots) != load(pb, roots):
            out.append(f"{f}: differs" + (" (not counted: settings record or log)" if f in NOT_COUNTED else ""))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    args = ap.parse_args()
    lines = compare(args.run_a, args.run_b)
    print("\n".join(lines) or "identical apart from timings and paths")
    return 1 if any("not counted" not in line for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
