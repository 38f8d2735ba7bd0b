"""Building amq's CUDA C++ kernels on first use (torch's extension builder), or saying why not.

Both CUDA kernels (`cuda_gemv`: one row; `cuda_mma`: 2 to 16 rows) have a Triton kernel that serves
where they cannot be built, so a failed build is one warning, never an error. Each module keeps its
built extension per compute capability (its own cache); the build itself is cached by torch in its
extensions folder, outside the repository.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)


def extension_name(name: str, source: Path, shipped: Path) -> str:
    """`name` for the shipped source; for another .cu with the same entry point (a variant measured
    beside it) a name of its own, from its content, so that both load in one process."""
    return name if source == shipped else f"{name}_{hashlib.sha256(source.read_bytes()).hexdigest()[:12]}"


def nvcc_flags(arch: str) -> list[str]:
    """The optimisation and target flags every amq kernel is built with (`arch`: "90" for sm_90); also
    what scripts/count_tile_instructions.py compiles with, so that it counts the code that runs."""
    return ["-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}"]


def build(
    name: str,
    cpp_source: str,
    cuda_source: Path,
    functions: list[str],
    capability: tuple[int, int],
    env: str,
    what: str,
    fallback: str,
    flags: Sequence[str] = (),
) -> ModuleType | None:
    """The extension `name`_sm<arch>, or None where `env` is "0" or it cannot be built (no nvcc, no
    compiler, a failed build; logged at each call, so callers cache). `what` names the kernel and
    `fallback` what serves without it, for the log."""
    if os.environ.get(env, "1").strip() == "0":
        return None
    arch = f"{capability[0]}{capability[1]}"
    try:
        from torch.utils.cpp_extension import load_inline

        log.info("building the %s for sm_%s (once per machine; cached by torch)", what, arch)
        return load_inline(
            name=f"{name}_sm{arch}",
            cpp_sources=cpp_source,
            cuda_sources=cuda_source.read_text(),
            functions=functions,
            extra_cuda_cflags=[*nvcc_flags(arch), *flags],
            verbose=False,
        )
    except Exception as exc:  # no nvcc, no compiler, a failed build: the Triton kernel serves
        log.warning("the %s could not be built (%s: %s); %s (%s=0 silences this)", what, type(exc).__name__, str(exc)[:300], fallback, env)
        return None
