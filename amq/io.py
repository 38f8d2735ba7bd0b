"""Atomic file writes and JSON-lines helpers.

Every result file is written to a temporary sibling and renamed into place, so a reader (or a
resumed run) never sees a half-written file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        _name_file(exc, path)
        raise


def _name_file(exc: BaseException, path: str | Path) -> None:
    """Say which file a failed write was for (write() and flush() errors don't)."""
    if isinstance(exc, OSError) and exc.filename is None:
        exc.filename = str(path)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_bytes_with(path: str | Path, writer) -> None:
    """Call `writer(tmp_path)` to produce a file, then rename it to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        _name_file(exc, path)
        raise


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `<path>.lock` (fcntl; released if the process dies).

    Atomic publish alone keeps a shared cache uncorrupted; the lock also makes parallel jobs of a
    sweep wait for the first one to build an entry instead of all computing it at once.
    """
    lock = Path(f"{path}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def remove_stale_temps(path: str | Path) -> int:
    """Remove temporary siblings of `path` left by a writer that was killed mid-write.

    Only the sole writer of `path` may call this (the run for its own files, the holder of the
    entry's `file_lock` for a shared cache entry). Returns how many were removed.
    """
    path = Path(path)
    removed = 0
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one record and flush it to disk, so a crash loses at most the line being written.

    A write that fails part-way (disk full, file size limit, an exception between writes) is cut
    back off, so the file never keeps half a line; only a killed process can leave one.
    """
    data = memoryview((json.dumps(record) + "\n").encode("utf-8"))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            _name_file(exc, path)
            raise
    finally:
        os.close(fd)


def read_jsonl(path: str | Path) -> Iterator[dict]:
    """Yield records; a torn last line (crash mid-write) is skipped, not fatal."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def repair_jsonl(path: str | Path) -> list[dict]:
    """The records of an append-only file; a torn last line (a killed writer) is cut off, so the
    next append starts on a line of its own."""
    path = Path(path)
    if not path.exists():
        return []
    records = list(read_jsonl(path))
    text = path.read_bytes()
    if text and not text.endswith(b"\n"):
        write_jsonl(path, records)
    return records


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes, read in chunks (model files and downloads are large)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def replace_dir(tmp: Path, out_dir: Path) -> None:
    """Publish a directory written in full at `tmp` as `out_dir`, replacing any earlier one: a
    reader sees the old directory or the new one, never a mix."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
