"""A setting that doesn't exist, or holds the wrong type, is an error before anything runs.

Hydra already refuses to override a key the config lacks (`budget.iteratons=3`), but a key added
with `+`, `++` or in an experiment file would otherwise be ignored without a word, and a value of
the wrong type (`budget.iterations=many`) would fail deep inside a stage. The composed config is
compared with what `conf/` declares: every key must appear in some option of its group (or be a
parameter of the node's `_target_`), and every value must have the type of that key's defaults.
"""

from __future__ import annotations

import difflib
import inspect
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from amq.errors import ConfigError

PRIMARY = "train_search.yaml"
NOT_SETTINGS = ("hydra", "experiment", "sweep")  # conf/ folders that hold no settings group of their own
PRESETS = ("space",)  # groups of `# @package _global_` presets: their keys belong to other groups' nodes
# Nested groups (conf/finalize/protocol/) merge into their parent group's node.
TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a mapping"}
ITEM_WORDS = {bool: "booleans", int: "integers", float: "numbers", str: "strings", list: "lists"}


@dataclass
class Declared:
    """What conf/ declares: the keys of every node and the types of every leaf's defaults."""

    keys: dict[str, set[str]] = field(default_factory=dict)
    types: dict[str, set[type]] = field(default_factory=dict)
    item_types: dict[str, set[type]] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # `sensitivity_seeds: ${budget.sensitivity_seeds}`: the types of what it interpolates

    def types_of(self, path: str) -> tuple[set[type], set[type]]:
        """(types of the value, types of its items) declared for `path`, following one alias."""
        path = path if path in self.types else self.aliases.get(path, path)
        return self.types.get(path, set()), self.item_types.get(path, set())

    def add(self, path: str, node: dict) -> None:
        self.keys.setdefault(path, set()).update(k for k in node if k != "defaults")
        for key, value in node.items():
            if key == "defaults":
                continue
            sub = f"{path}.{key}" if path else key
            if isinstance(value, dict):
                self.add(sub, value)
                continue
            alias = re.fullmatch(r"\$\{([\w.]+)\}", value) if isinstance(value, str) else None
            if alias:
                self.aliases[sub] = alias.group(1)
            kind = _declared_type(value)
            if kind is not None:
                self.types.setdefault(sub, set()).add(kind)
            if isinstance(value, list):
                self.item_types.setdefault(sub, set()).update(t for t in map(_declared_type, value) if t is not None)


def _declared_type(value: Any) -> type | None:
    """The type a default declares (None: an interpolation, `???`, or a list of them, says nothing)."""
    if isinstance(value, str) and ("${" in value or value == "???"):
        return None
    return type(value)


@lru_cache(maxsize=4)
def declared(conf_dir: str) -> Declared:
    root = Path(conf_dir)
    out = Declared()
    primary = yaml.safe_load((root / PRIMARY).read_text()) or {}
    out.add("", primary)
    out.keys[""].add("hydra")  # Hydra's own node (present when composed with it): not ours to check
    for entry in primary.get("defaults", []):
        if isinstance(entry, dict):
            ((group, choice),) = entry.items()
            group = group.removeprefix("optional ")
            if not group.startswith("override ") and group.split("/")[0] not in NOT_SETTINGS + PRESETS and "@" not in group and choice is not None:
                out.keys[""].add(group)
    for option in sorted(root.rglob("*.yaml")):
        group = option.parent.relative_to(root).parts
        if not group or group[0] in NOT_SETTINGS:
            continue
        text = option.read_text()
        package = "" if text.startswith("# @package _global_") else group[0]  # presets of several groups (conf/space/)
        out.add(package, yaml.safe_load(text) or {})
    return out


def check_settings(cfg: DictConfig, conf_dir: str | Path) -> None:
    """Raise ConfigError for the first unknown key or wrongly typed value in `cfg`."""
    _check_node(cfg, "", declared(str(conf_dir)))


def _target_parameters(node: DictConfig) -> set[str] | None:
    """Keyword parameters of the node's `_target_` (None: it takes any, or can't be inspected)."""
    target = node.get("_target_")
    if not target:
        return set()
    try:
        params = inspect.signature(get_object(str(target))).parameters.values()
    except Exception:  # a user's own class that doesn't import here: instantiate() will report it
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def _check_node(node: DictConfig, path: str, decl: Declared) -> None:
    known = decl.keys.get(path)
    if known is None:
        return  # a node conf/ doesn't describe (e.g. a user's own mapping): nothing to compare with
    params = _target_parameters(node)
    if params is None:
        valid = None
    elif "_target_" in node:  # the target's own parameters, not those of the group's other options
        valid = params | {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
    else:
        valid = known
    for key in node:
        sub = f"{path}.{key}" if path else str(key)
        if sub == "hydra":
            continue
        if valid is not None and key not in valid:
            hint = difflib.get_close_matches(str(key), sorted(valid), n=1)
            choices = ", ".join(sorted(k for k in valid if not k.startswith("_")))
            raise ConfigError(sub, "no such setting" + (f"; did you mean {hint[0]}?" if hint else ""), choices)
        try:
            value = node[key]
        except Exception:  # unresolvable here (a mandatory value, a Hydra-only interpolation): checked where used
            continue
        if isinstance(value, DictConfig):
            _check_node(value, sub, decl)
        else:
            _check_type(value, sub, decl)


def _check_type(value: Any, path: str, decl: Declared) -> None:
    declared_kinds, items = decl.types_of(path)
    kinds = declared_kinds - {type(None)}
    if not kinds:
        return
    if isinstance(value, ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if value is None and type(None) in declared_kinds:
        return
    if not _fits(value, kinds):
        raise ConfigError(path, f"{value!r} has the wrong type", " or ".join(TYPE_WORDS.get(k, k.__name__) for k in sorted(kinds, key=str)))
    if isinstance(value, list) and len(items) == 1:
        for item in value:
            if not _fits(item, items):
                raise ConfigError(path, f"item {item!r} of {value!r} has the wrong type", f"a list of {ITEM_WORDS.get(next(iter(items)), 'values')}")


def _fits(value: Any, kinds: set[type]) -> bool:
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, int) and (int in kinds or float in kinds):
        return True
    return any(isinstance(value, k) and k is not bool for k in kinds)
