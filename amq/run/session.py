"""One search's run directory from its start to its end.

`RunSession.open()` decides whether the run continues an earlier one (`resume=`), stops cleanly
on SIGINT/SIGTERM and for lack of memory or disk, and removes a directory it just created when a
setting is refused before any checkpoint exists. The other methods write what a run writes, in
the order resume relies on: config.yaml first, then sensitivity.json and state.json once the
search space is known, then after every iteration metrics.jsonl, the front and state.json.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from amq.errors import ConfigError
from amq.io import atomic_write_json, atomic_write_text
from amq.run.faults import resource_errors
from amq.run.interrupts import GracefulStop, Interrupted
from amq.run.outputs import ARCHIVE_FILE, CONFIG_FILE, SUMMARY_FILE, RunOutputs
from amq.run.resume import TIME_LIMIT, check_resumable, continue_past_time_limit, resume_command
from amq.run.run_lock import RunLock
from amq.run.state import STATE_FILE, RunState
from amq.search.archive import Archive

log = logging.getLogger("amq")


class RunSession:
    def __init__(self, run_dir: Path) -> None:
        self.dir = Path(run_dir)
        self.outputs: RunOutputs | None = None
        self.resuming = False

    @contextlib.contextmanager
    def open(self, memory: Mapping[str, Any]) -> Iterator[GracefulStop]:
        """The run's lifetime: yields the graceful stop whose `deferred` guards each evaluation
        (`memory`: the settings an out-of-memory message names, with their values)."""
        new_dir = not (self.dir / CONFIG_FILE).is_file()  # Hydra just made it: remove it again on a user error
        lock = RunLock(self.dir)
        lock.acquire()  # one process a run directory (amq/run/run_lock.py): before anything is read or written
        try:
            with GracefulStop() as stop, resource_errors(memory, self.dir):
                self.outputs = RunOutputs(self.dir)
                yield stop
        except ConfigError:
            if new_dir:
                self._remove_fresh_run_dir()
            raise
        except Interrupted as exc:
            log.warning("%s; every finished evaluation is saved in %s. Continue with:\n  %s", exc, self.dir, resume_command(self.dir))
            raise
        finally:
            lock.release()

    def check_resume(self, resume: str | None, settings: dict[str, Any], iterations: int) -> bool:
        """Whether this run continues an earlier one in its directory (checked: same `settings`,
        unfinished or extended by `iterations`); sets `resuming`."""
        self.resuming = self._continues(resume, settings, iterations)
        return self.resuming

    def _continues(self, resume: str | None, settings: dict[str, Any], iterations: int) -> bool:
        if not resume:
            return False
        if resume == "auto":
            if not (self.dir / CONFIG_FILE).is_file():
                return False  # no unfinished run with these settings: a new one
        elif Path(resume).expanduser().absolute() != self.dir.absolute():
            check_resumable(Path(resume), settings, iterations)  # the reason it wasn't chosen as the run directory
            raise ConfigError("resume", f"continues in its own directory, but paths.output_dir is {self.dir}", "leave paths.output_dir unset when resuming")
        check_resumable(self.dir, settings, iterations)
        return True

    def _remove_fresh_run_dir(self) -> None:
        """After a user error in a new run, before its checkpoint existed, remove the directory Hydra made."""
        if self.dir.is_dir() and not any((self.dir / n).exists() for n in (STATE_FILE, ARCHIVE_FILE)):
            shutil.rmtree(self.dir, ignore_errors=True)

    def begin(self, config_yaml: str) -> None:
        """A new run records its settings first; a continued one drops what a killed process left half-written."""
        if self.resuming:
            self.outputs.remove_stale_temps()
        else:
            atomic_write_text(self.outputs.path(CONFIG_FILE), config_yaml)

    def start_search(self, space_fingerprint: str, seed: int, sensitivity: dict) -> int:
        """Check that an earlier checkpoint belongs to this search space, write sensitivity.json and
        the first checkpoint; returns the iteration to start from (0 for a new run)."""
        state = self.outputs.read_state()
        if state is not None and state.space_fingerprint != space_fingerprint:
            raise ConfigError(
                "resume",
                f"{self.dir} was searched over a different model or search space",
                "the same model, bits, group size, data and pruning settings as the original run",
            )
        if state is None and self.outputs.archive_path.exists():
            raise ConfigError("resume", f"{self.dir} has an archive but no {STATE_FILE}", "restore it, or start a new run")
        atomic_write_json(self.outputs.path("sensitivity.json"), sensitivity)
        if state is None:
            self.outputs.write_state(RunState(space_fingerprint, -1, seed))
        self.outputs.path(SUMMARY_FILE).unlink(missing_ok=True)  # a continued run is not finished until it writes it again
        return state.next_iteration if state else 0

    def log_time_limit_stop(self, stopped: dict, max_minutes: float | None) -> None:
        """Say where the time limit stopped the search and how to continue it."""
        log.info(
            "search stopped on its time limit (%s=%g, counted from this run's start) after iteration %d of %d; the front so far is written. "
            "Continue it with no limit (or a new one, counted from the continued run's start): %s",
            TIME_LIMIT,
            max_minutes,
            stopped["after_iteration"],
            stopped["of"],
            continue_past_time_limit(self.dir),
        )

    def write_summary(self, summary: dict) -> None:
        atomic_write_json(self.outputs.path(SUMMARY_FILE), summary)


class IterationObserver:
    """After every iteration: metrics.jsonl, front.json/csv and state.json on disk, then the tracker.

    The plots (front.png, predictor.png) are drawn after an iteration only when `plot_every_s`
    seconds have passed since the last drawing (0: after every iteration), and always by `finish()`
    at the end of the search. A drawing costs about 0.3 s of matplotlib: nothing beside an
    iteration of minutes, but a quarter of a seconds-long smoke search."""

    def __init__(
        self,
        outputs: RunOutputs,
        rows: list[dict],
        metric_name: str,
        title: str,
        space_fingerprint: str,
        seed: int,
        tracker: Any,
        targets: Sequence[float],
        plot_every_s: float,
    ) -> None:
        self.outputs, self.rows, self.metric_name, self.title = outputs, rows, metric_name, title
        self.space_fingerprint, self.seed, self.tracker, self.targets = space_fingerprint, seed, tracker, tuple(targets)
        self.plot_every_s = float(plot_every_s)
        self._drawn_at = time.monotonic()  # the search's start: a first iteration of seconds is not drawn either
        self._undrawn: tuple[int, Archive] | None = None  # (step, archive) of the last iteration, when its plots were skipped

    def __call__(self, row: dict, archive: Archive) -> None:
        step = row["iteration"]
        self.rows.append(row)
        self.outputs.write_metrics(self.rows)
        draw = time.monotonic() - self._drawn_at >= self.plot_every_s
        front = self.outputs.write_front(archive, self.metric_name, self.title, self.targets, plot=draw)
        self.outputs.write_state(RunState(self.space_fingerprint, step, self.seed))
        self.tracker.log(row, step=step)
        if draw:
            self._log_plots(front, archive, step)
        else:
            self.tracker.log_front(front, self.metric_name, None, step=step)
        self._undrawn = None if draw else (step, archive)

    def finish(self, front: list[dict]) -> None:
        """After the final front.png (`RunOutputs.write_front`): the plots the last iteration skipped."""
        if self._undrawn is not None:
            step, archive = self._undrawn
            self._log_plots(front, archive, step)
            self._undrawn = None

    def _log_plots(self, front: list[dict], archive: Archive, step: int) -> None:
        self.tracker.log_front(front, self.metric_name, self.outputs.path("front.png"), step=step)
        predictor_png = self.outputs.write_predictor_plot(archive, self.metric_name, self.title)
        if predictor_png is not None:
            self.tracker.log_image("predictor/predicted_vs_measured", predictor_png, step=step)
        self._drawn_at = time.monotonic()
