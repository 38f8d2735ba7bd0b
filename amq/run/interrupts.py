"""Graceful stop on SIGINT / SIGTERM: finish the evaluation in flight, then stop cleanly.

A search is safe to stop anywhere: every result file is published atomically and the archive is
appended one flushed line per evaluation, so an interrupted run resumes exactly. What a graceful
stop adds is not losing the evaluation being computed and leaving a tidy run: the W&B run closed,
the resume command printed, and an exit status that says which signal stopped it (130 for SIGINT,
143 for SIGTERM, as shells report them).

Outside an evaluation a signal stops the run at once (model loading, proxy build, sensitivity,
predictor fit and NSGA-II keep nothing half-done). Inside one, the first signal is held until the
evaluation is archived; a second signal abandons it.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from types import FrameType
from typing import Iterator

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """The run was asked to stop by a signal (a BaseException, like KeyboardInterrupt, so that
    `except Exception` blocks on the way up do not swallow it)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class GracefulStop:
    """Context manager that turns SIGINT/SIGTERM into `Interrupted`, held back inside `deferred()`.

    Only the main thread can own signal handlers; elsewhere (a launcher's worker thread) this is a
    no-op and signals keep their default behaviour.
    """

    def __init__(self) -> None:
        self._previous: dict[int, object] = {}
        self._deferring = False
        self._pending: int | None = None
        self._stopping = False  # raised once: cleanup (state, tracker) is under way
        self._ignored = 0

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold a first signal until the block ends (an evaluation and its archive line), then stop."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self._pending is not None:
            self._stop(self._pending)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self._stopping and self._ignored == 0:
            self._ignored += 1
            log.warning("%s: already stopping (send it again to skip the cleanup)", name)
            return
        if self._deferring and self._pending is None:
            self._pending = signum
            log.warning("%s: stopping after the evaluation in flight (send it again to abandon that evaluation)", name)
            return
        self._stop(signum)

    def _stop(self, signum: int) -> None:
        self._pending = None
        self._stopping = True
        raise Interrupted(signum)
