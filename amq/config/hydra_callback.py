"""A Hydra callback that chooses the run directory before Hydra creates or writes anything.

With `resume=<dir>` or `resume=auto` (amq/run/resume.py) it points the run at the directory it
continues, keeps that run's original `.hydra/` record (what was asked for first), and refuses a bad
`resume=` or an unwritable output folder with one line and exit status 2. Registered in
conf/hydra/default.yaml.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from amq.config.compose import resume_settings
from amq.errors import ConfigError
from amq.run.resume import check_resumable, find_unfinished, probe_writable
from amq.run.run_lock import in_use, in_use_error

log = logging.getLogger(__name__)


def _set_hydra(config: DictConfig, key: str, value: Any) -> None:
    with read_write(config.hydra), open_dict(config.hydra):
        OmegaConf.update(config.hydra, key, value, merge=False)


class RunDirCallback(Callback):
    """Chooses the run directory before Hydra creates it (see the module docstring)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            self._choose(config)
        except ConfigError as exc:
            log.error("%s", exc)
            sys.exit(exc.exit_code)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        resume = config.get("resume")
        if resume and resume != "auto":
            log.error(
                "%s",
                ConfigError("resume", f"{resume!r} continues one run, not a multirun", "auto (each job continues its own unfinished run), or a single run"),
            )
            sys.exit(2)
        try:
            sweep_dir = Path(str(config.hydra.sweep.dir))
            _set_hydra(config, "sweep.dir", str(sweep_dir))  # freeze the time stamp it was probed with
            probe_writable(sweep_dir, "paths.log_dir")
        except ConfigError as exc:
            log.error("%s", exc)
            sys.exit(exc.exit_code)

    @staticmethod
    def _choose(config: DictConfig) -> None:
        resume = config.get("resume")
        fresh = Path(str(config.hydra.run.dir))
        target = None
        if resume:
            _, settings, iterations = resume_settings(config)
            if resume == "auto":
                target = find_unfinished(fresh.parent, settings, iterations)
                if target is None:
                    log.info("resume=auto: no unfinished run with these settings in %s; starting a new one", fresh.parent)
                else:
                    log.info("resume=auto: continuing %s", target)
            else:
                target = Path(str(resume)).expanduser().absolute()
                check_resumable(target, settings, iterations)
                if in_use(target):
                    raise in_use_error(target)
        if target is None:
            _set_hydra(config, "run.dir", str(fresh))  # freeze the time stamp it was probed with
            probe_writable(fresh, "paths.log_dir")
            return
        probe_writable(target, "resume")
        _set_hydra(config, "run.dir", str(target))
        _set_hydra(config, "output_subdir", None)  # keep the original run's .hydra/ record
