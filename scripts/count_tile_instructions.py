#!/usr/bin/env python
"""Instructions per K tile of the CUDA tile kernel (amq/runtime/cuda/mma_planes.cu) and of its
variants, counted in the machine code nvcc makes, without a GPU.

Why: at 8-16 rows the kernel is bound by instruction issue (docs/benchmarks.md, "What bounds the
kernel, measured"), so the instructions its main loop issues per tile follow its time: the first
version issued 797 against 663 per tile at 3 and 4 bits (16 rows, group 128) where the timed ratio was
1.16-1.27, and the shipped one, 23-28% fewer, took 0.71-0.97x of its time. A variant can be judged
here first and timed on a GPU after (`bench_tile_kernel.py --variant`).

For each source it compiles the kernels (`nvcc -cubin`, the flags `amq.runtime.cuda_build` uses),
disassembles them (`cuobjdump -sass`), finds in each instance the loop that holds its mma
instructions (from the loop's head to its backward branch) and counts the instructions in it. One
tile is 16 weight rows x 256 input features per warp, 128 weights per lane.

    python3 scripts/count_tile_instructions.py [--source A.cu B.cu] [--arch 90] [--json out.json]

Needs nvcc (the CUDA toolkit) and cuobjdump with nvdisasm (the toolkit's, or `pip install
nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm`; `--cuobjdump PATH` or $CUOBJDUMP names it).
Default sources: the shipped kernel and every scripts/kernel_variants/*.cu.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from amq.runtime.cuda_build import nvcc_flags  # noqa: E402
from amq.runtime.cuda_mma import SOURCE as SHIPPED  # noqa: E402

VARIANTS = ROOT / "scripts" / "kernel_variants"
WEIGHTS_PER_LANE = 16 * 256 // 32  # one warp's tile: 16 weight rows x 256 input features
_INSTANCE = re.compile(r"mma_planes_kernelILi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)E")
_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)\S*\s*([^;]*);")


def find_tool(name: str, first: tuple[str | None, ...] = (), last: tuple[str, ...] = ()) -> str | None:
    """The first executable of: `first`, `name` on PATH, $CUDA_HOME/bin/`name`, `last`."""
    home = os.environ.get("CUDA_HOME")
    candidates = [*first, shutil.which(name), str(Path(home) / "bin" / name) if home else None, *last]
    return next((c for c in candidates if c and Path(c).is_file() and os.access(c, os.X_OK)), None)


def find_cuobjdump(given: str | None) -> str | None:
    """cuobjdump from --cuobjdump, $CUOBJDUMP, PATH, $CUDA_HOME/bin or the pip wheels' nvidia/cu*/bin."""
    wheels = tuple(str(p) for p in sorted(Path(sysconfig.get_path("purelib")).glob("nvidia/cu*/bin/cuobjdump")))
    return find_tool("cuobjdump", (given, os.environ.get("CUOBJDUMP")), wheels)


def loop_counts(sass: str) -> dict[tuple[int, int, int, int], int]:
    """Per kernel instance (P0, P1, NG, MT): instructions of the loop that holds its mma instructions."""
    counts = {}
    for function in re.split(r"\n\s*Function : ", sass)[1:]:
        match = _INSTANCE.search(function.split("\n", 1)[0])
        if not match:
            continue
        code = [(int(a, 16), op, rest) for a, op, rest in _LINE.findall(function)]
        mmas = [a for a, op, _ in code if op == "HMMA"]
        if not mmas:
            continue
        # the loop: a backward branch after the last mma whose target is at or before the first
        for address, op, rest in code:
            target = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
            if target and address > mmas[-1] and int(target.group(1), 16) <= mmas[0]:
                head = int(target.group(1), 16)
                counts[tuple(int(g) for g in match.groups())] = sum(1 for a, _, _ in code if head <= a <= address)
                break
    return counts


def compile_and_count(source: Path, arch: str, nvcc: str, cuobjdump: str) -> dict[tuple[int, int, int, int], int]:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        flags = [*nvcc_flags(arch), "-std=c++17", "-cubin", "-o", str(cubin), str(source)]
        subprocess.run([nvcc, *flags], check=True, capture_output=True, text=True)
        env = dict(os.environ, PATH=f"{Path(cuobjdump).parent}{os.pathsep}{os.environ.get('PATH', '')}")  # nvdisasm beside it
        sass = subprocess.run([cuobjdump, "-sass", str(cubin)], check=True, capture_output=True, text=True, env=env).stdout
    return loop_counts(sass)


def table(results: dict[str, dict[tuple[int, int, int, int], int]]) -> str:
    names = list(results)
    keys = sorted({k for r in results.values() for k in r}, key=lambda k: (k[0] + k[1], -k[2], k[3]))
    lines = [
        "| bits | group | rows | " + " | ".join(f"{n} (per tile / per weight)" for n in names) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in names) + " |",
    ]
    for p0, p1, ng, mt in keys:
        group = f"{256 // ng}" if ng > 1 else "256+"
        cells = [
            f"{results[n][(p0, p1, ng, mt)]} / {results[n][(p0, p1, ng, mt)] / WEIGHTS_PER_LANE:.2f}" if (p0, p1, ng, mt) in results[n] else "-" for n in names
        ]
        lines.append(f"| {p0 + p1} | {group} | {'2-8' if mt == 1 else '9-16'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", nargs="+", type=Path, default=None, help="kernel sources (default: the shipped one and scripts/kernel_variants/*.cu)")
    p.add_argument("--arch", default="90", help="compute capability without the dot (default 90: Hopper)")
    p.add_argument("--cuobjdump", default=None, help="path of cuobjdump (nvdisasm must sit beside it or on PATH)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    sources = args.source or [SHIPPED, *sorted(VARIANTS.glob("*.cu"))]
    missing = [str(s) for s in sources if not s.is_file()]
    if missing:
        p.error(f"--source: no such file: {', '.join(missing)}")
    if not re.fullmatch(r"\d{2,3}a?", args.arch):
        p.error(f"--arch: {args.arch!r} (valid: a compute capability without the dot, e.g. 80, 90, 90a)")
    nvcc = find_tool("nvcc")
    if nvcc is None:
        print("count_tile_instructions needs nvcc (the CUDA toolkit) on PATH or under $CUDA_HOME/bin", file=sys.stderr)
        return 2
    cuobjdump = find_cuobjdump(args.cuobjdump)
    if cuobjdump is None:
        print(
            "count_tile_instructions needs cuobjdump and nvdisasm: the CUDA toolkit's, or "
            "`pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm` (then --cuobjdump or $CUOBJDUMP names it)",
            file=sys.stderr,
        )
        return 2
    results = {}
    for source in sources:
        try:
            counts = compile_and_count(source, args.arch, nvcc, cuobjdump)
        except subprocess.CalledProcessError as exc:
            print(f"count_tile_instructions: {' '.join(exc.cmd[:1])} failed on {source}:\n{exc.stderr[-2000:]}", file=sys.stderr)
            return 1
        if not counts:
            print(f"count_tile_instructions: no mma_planes_kernel instance with an mma loop in {source}", file=sys.stderr)
            return 1
        results[source.stem if source != SHIPPED else "shipped"] = counts
    print(table(results))
    if args.json:
        payload = {name: {f"{p0 + p1}b_ng{ng}_mt{mt}": n for (p0, p1, ng, mt), n in counts.items()} for name, counts in results.items()}
        args.json.write_text(json.dumps({"arch": args.arch, "loop_instructions": payload}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
