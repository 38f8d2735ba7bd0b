"""A content-keyed cache of true evaluations, shared by every run, seed and sweep job.

A true evaluation is a pure function of the model, the proxy quantizer's settings, the metric and
its data, and the bits of every module. The cache keys each value by exactly that: a *context*
(everything but the configuration, hashed into a folder) and the configuration's bits by module
name (hashed into the entry's file name). A run with another seed, a sweep job or a rerun that
meets a configuration measured before under the same context takes the number instead of
measuring it again.

One small JSON file per entry, published atomically (temp file + rename), so parallel jobs never
see a half-written entry and need no lock: two jobs measuring the same configuration write the
same value. Each entry carries a checksum of its content; an entry that fails to parse or to
verify (truncated, corrupted, edited) is measured again and rewritten, never trusted. Only
successful evaluations are cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np

from amq.io import atomic_write_json, atomic_write_text
from amq.search.evaluator import Evaluate, Evaluation
from amq.search.space import SearchSpace

log = logging.getLogger(__name__)

ENTRY_VERSION = 1


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _checksum(context: str, key: str, value: float, seconds: float) -> str:
    return _digest([ENTRY_VERSION, context, key, repr(float(value)), repr(float(seconds))])


class EvaluationStore(Protocol):
    """Cached values of one context."""

    def get(self, bits: Mapping[str, int]) -> tuple[float, float] | None:
        """(value, seconds it took when measured), or None when absent or not trustworthy."""

    def put(self, bits: Mapping[str, int], value: float, seconds: float) -> None: ...


class EvaluationCache(Protocol):
    def store(self, context: dict) -> EvaluationStore | None:
        """The store of one evaluation context (None: caching is off)."""


@dataclass(frozen=True)
class NoEvaluationCache:
    """eval_cache=none: every configuration is measured."""

    def store(self, context: dict) -> None:
        return None


@dataclass(frozen=True)
class DiskEvaluationCache:
    """eval_cache=disk: entries under `dir/<context hash>/<2 hex>/<configuration hash>.json`."""

    dir: str

    def store(self, context: dict) -> "DiskEvaluationStore":
        ctx = _digest(context)[:24]
        folder = Path(self.dir) / ctx
        described = folder / "context.json"
        if not described.is_file():  # what the hash stands for, for people reading the cache
            try:
                atomic_write_json(described, context)
            except OSError as exc:  # a read-only shared cache still serves what it holds
                log.warning("evaluation cache: cannot write %s (%s); reading only", folder, exc.strerror or exc)
        return DiskEvaluationStore(folder, ctx)


@dataclass(frozen=True)
class DiskEvaluationStore:
    folder: Path
    context: str

    @staticmethod
    def _key(bits: Mapping[str, int]) -> str:
        return _digest(sorted((str(k), int(v)) for k, v in bits.items()))[:40]

    def path_of(self, bits: Mapping[str, int]) -> Path:
        """Where the entry of a configuration lives (whether or not it exists)."""
        key = self._key(bits)
        return self.folder / key[:2] / f"{key}.json"

    def get(self, bits: Mapping[str, int]) -> tuple[float, float] | None:
        key = self._key(bits)
        path = self.path_of(bits)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("evaluation cache: cannot read %s (%s); measuring it", path, exc.strerror or exc)
            return None
        try:
            entry = json.loads(text)
            value, seconds = float(entry["value"]), float(entry["seconds"])
            trusted = (
                entry["version"] == ENTRY_VERSION
                and entry["key"] == key
                and entry["checksum"] == _checksum(self.context, key, value, seconds)
                and math.isfinite(value)
            )
        except (ValueError, KeyError, TypeError):
            trusted = False
        if not trusted:
            log.warning("evaluation cache: entry %s is corrupted or truncated; measuring it again", path.name)
            return None
        return value, seconds

    def put(self, bits: Mapping[str, int], value: float, seconds: float) -> None:
        """Publish an entry; a cache that can't be written (disk full, read-only) only costs reuse."""
        key = self._key(bits)
        entry = {
            "version": ENTRY_VERSION,
            "key": key,
            "value": float(value),
            "seconds": float(seconds),
            "checksum": _checksum(self.context, key, value, seconds),
        }
        try:
            atomic_write_text(self.path_of(bits), json.dumps(entry) + "\n")
        except OSError as exc:
            log.warning("evaluation cache: cannot write %s (%s); this value is not cached", self.folder, exc.strerror or exc)


@dataclass
class CachedEvaluator:
    """Looks a configuration up before measuring it; publishes what it measured successfully."""

    evaluate: Evaluate
    store: EvaluationStore
    space: SearchSpace

    def __call__(self, genes: np.ndarray) -> Evaluation:
        bits = self.space.to_bits(genes)  # the cache is keyed by bits per module name, not by gene index
        t0 = time.perf_counter()
        if (hit := self.store.get(bits)) is not None:
            return Evaluation(hit[0], time.perf_counter() - t0, reused=True)
        result = self.evaluate(genes)
        if result.ok:
            self.store.put(bits, result.value, result.seconds)
        return result


def with_cache(evaluate: Evaluate, cache: EvaluationCache, context: dict, space: SearchSpace) -> Evaluate:
    """`evaluate` behind the cache's store for `context` (unchanged when caching is off)."""
    store = cache.store(context)
    if store is None:
        return evaluate
    log.info("evaluation cache: %s", getattr(store, "folder", store))
    return CachedEvaluator(evaluate, store, space)
