"""One process per run directory.

A requeued job whose predecessor is still draining, or the same command started twice, would
otherwise append to one archive from two processes. The process that runs a search holds an
exclusive advisory lock (fcntl) on `<run dir>/.amq-search.lock` for its whole life; the operating
system releases it when the process ends, however it ends (SIGKILL included), so a lock never
outlives its holder and there is nothing to clean up. `resume=auto` passes over a run that another
process holds, and `resume=<dir>` on one is refused.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from amq.errors import ConfigError

log = logging.getLogger(__name__)

LOCK_FILE = ".amq-search.lock"


class RunLock:
    """The lock of one run directory, held from `acquire()` until `release()` or the process's end."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise ConfigError (naming `resume`) when another process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)  # a run started from Python names a folder Hydra did not make
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise in_use_error(self.path.parent) from None
        except OSError as exc:  # a filesystem without flock (some network mounts): run, unguarded
            os.close(fd)
            log.warning("cannot lock %s (%s): nothing keeps a second process out of this run", self.path, exc.strerror or exc)
            return
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None


def in_use(run_dir: Path) -> bool:
    """Whether another process holds `run_dir`'s lock now (a process that holds it itself must not ask)."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False  # no lock file: no process ever ran a search there since locks existed
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False  # no flock on this filesystem: no process can be holding it
    finally:
        os.close(fd)


def in_use_error(run_dir: Path) -> ConfigError:
    return ConfigError(
        "resume",
        f"{run_dir} is in use: another amq-search process is running it",
        "wait for that process to end (or stop it), then continue the run; resume=auto meanwhile starts a new one",
    )
