"""Running out of memory or disk becomes one message that says what to change and how to continue.

The run directory is always safe to continue from (atomic files, an append-only archive), so a
stop for lack of resources loses at most the evaluation in flight; the message names the settings
that lower memory, or the path that could not be written, and gives the resume command.
"""

from __future__ import annotations

import contextlib
import errno
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from amq.errors import ResourceError
from amq.run.resume import resume_command

# Write failures that mean "no room" or "not allowed here", not a bug.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}
CPU_OOM_MARKERS = ("DefaultCPUAllocator: can't allocate memory", "not enough memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """An accelerator's out-of-memory error, or the CPU allocator failing."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in CPU_OOM_MARKERS)


def out_of_memory_message(exc: BaseException, memory: Mapping[str, Any], run_dir: Path) -> str:
    """What to lower, with the values the run has now (`memory`: setting -> value, `memory_settings` of
    amq.config.compose)."""
    where = "GPU" if isinstance(exc, torch.OutOfMemoryError) else "CPU"
    now = {k: memory.get(k) for k in ("metric.batch_size", "metric.chunk_tokens", "quantizer.storage", "budget.n_samples", "budget.seq_len")}
    return (
        f"out of {where} memory. Lower metric.batch_size (now {now['metric.batch_size']}) or metric.chunk_tokens (now {now['metric.chunk_tokens']}), "
        f"or set quantizer.storage=packed (now {now['quantizer.storage']}): these may change when continuing with "
        f"{resume_command(run_dir)} <setting>=<value>. Or start a new run on fewer calibration tokens: "
        f"budget.n_samples (now {now['budget.n_samples']}) x budget.seq_len (now {now['budget.seq_len']})"
    )


def disk_message(exc: OSError, run_dir: Path) -> str:
    what = exc.filename or run_dir
    return (
        f"cannot write {what} ({exc.strerror or exc}). The run directory {run_dir} holds every finished "
        f"evaluation; make room (or fix permissions) and continue with: {resume_command(run_dir)}"
    )


@contextlib.contextmanager
def resource_errors(memory: Mapping[str, Any], run_dir: Path) -> Iterator[None]:
    """Turn out-of-memory and disk-write errors raised inside the block into ResourceError."""
    try:
        yield
    except (RuntimeError, OSError) as exc:
        if is_out_of_memory(exc):
            raise ResourceError(out_of_memory_message(exc, memory, run_dir)) from None
        if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
            raise ResourceError(disk_message(exc, run_dir)) from None
        raise
