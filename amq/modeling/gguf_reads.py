"""One parse of a GGUF file per conversion, instead of transformers' three.

transformers reads a GGUF through `gguf.GGUFReader` once for the tokenizer, once for the config
and once for the weights (each parse walks every metadata field, the 49,152-token vocabulary of
SmolLM2 included, in Python), and rebuilds gguf's tensor-name map once per module of the model
(397 times for SmolLM2). Together that is most of a first run's conversion. Both are looked up
on the `gguf` module at call time, so within `shared_gguf_reads()` they are memoized: a reader per
path, a name map per (architecture, block count). The reader is read-only (a memory map), so
sharing it changes nothing of what transformers builds; the originals are back on exit.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Iterator


@contextlib.contextmanager
def shared_gguf_reads() -> Iterator[None]:
    """Within the block, `gguf.GGUFReader(path)` parses each file once and the tensor-name map is built once."""
    import gguf

    reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (os.path.realpath(os.fspath(path)), mode)
        if key not in readers:
            readers[key] = reader_cls(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_cls, name_map
        readers.clear()
