"""state.json: the search's checkpoint record, typed and versioned.

Written after the sensitivity stage and after every iteration; `resume` continues from the
iteration after `last_completed_iteration`, in a space with the same fingerprint.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from amq.errors import ConfigError
from amq.io import atomic_write_json

STATE_VERSION = 1
STATE_FILE = "state.json"


@dataclass(frozen=True)
class RunState:
    space_fingerprint: str  # model and search space the archive belongs to (SearchSpace.fingerprint)
    last_completed_iteration: int  # -1: the initial design is not finished
    seed: int

    @property
    def next_iteration(self) -> int:
        return self.last_completed_iteration + 1


def read_state(run_dir: Path) -> RunState | None:
    """The run's state (None before its first checkpoint); a damaged or newer one is refused, not guessed."""
    p = Path(run_dir) / STATE_FILE
    if not p.exists():
        return None
    try:
        raw = json.loads(p.read_text())
        state = RunState(str(raw["space_fingerprint"]), int(raw["last_completed_iteration"]), int(raw.get("seed", 0)))
        version = int(raw.get("version", STATE_VERSION))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError("resume", f"{p} is damaged", "restore it, or start a new run") from None
    if version > STATE_VERSION:
        raise ConfigError("resume", f"{p} is version {version}, written by a newer amq", f"a run of state version <= {STATE_VERSION}, or a newer amq")
    return state


def write_state(run_dir: Path, state: RunState) -> None:
    atomic_write_json(Path(run_dir) / STATE_FILE, {"version": STATE_VERSION, **asdict(state)})
