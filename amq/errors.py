"""User-facing errors: reported as one line with a non-zero exit, never as a traceback.

Exit codes: 2 for a bad setting (`ConfigError`), 3 when the machine ran out of something the run
needs (`ResourceError`: memory, disk); an interrupted run exits 128 + the signal number
(`amq.run.interrupts`).

Domain code (search, proxy, predictors, metrics, modeling, quantizers) knows its own arguments,
not where they come from: it raises `InvalidArgument` naming the argument, and the composition
root (amq.config.compose) re-raises it as a `ConfigError` naming the setting the user wrote.
"""

import contextlib
from typing import Iterator, Mapping

EXIT_CONFIG = 2
EXIT_RESOURCE = 3


class ConfigError(ValueError):
    """A setting is invalid. The message names the setting and what would be valid."""

    exit_code = EXIT_CONFIG

    def __init__(self, setting: str, problem: str, valid: str | None = None) -> None:
        self.setting = setting
        self.problem = problem
        self.valid = valid
        msg = f"{setting}: {problem}"
        if valid:
            msg += f" (valid: {valid})"
        super().__init__(msg)


class InvalidArgument(ConfigError):
    """An argument of a domain object is invalid (`argument` is its parameter name, e.g. "bits").

    Reported as is when nothing maps it (exit 2, the argument named); the composition root maps it
    to the setting it came from."""

    def __init__(self, argument: str, problem: str, valid: str | None = None) -> None:
        super().__init__(argument, problem, valid)
        self.argument = argument

    def as_setting(self, setting: str) -> ConfigError:
        return ConfigError(setting, self.problem, self.valid)


def require_at_least(owner: object, argument: str, low: int, problem: str = "{value}") -> None:
    """Raise InvalidArgument unless the integer attribute `argument` of `owner` is >= `low`
    (`problem` may show the value as {value})."""
    value = getattr(owner, argument)
    if value < low:
        raise InvalidArgument(argument, problem.format(value=value), f"an integer >= {low}")


@contextlib.contextmanager
def settings_of(node: str = "", named: Mapping[str, str] | None = None) -> Iterator[None]:
    """Re-raise an `InvalidArgument` from inside the block as a ConfigError naming the setting:
    `named[argument]` where given, else `<node>.<argument>` (an argument "" is the node itself)."""
    try:
        yield
    except InvalidArgument as exc:
        raise exc.as_setting(setting_for(exc.argument, node, named)) from None


def setting_for(argument: str, node: str = "", named: Mapping[str, str] | None = None) -> str:
    if named and argument in named:
        return named[argument]
    return ".".join(part for part in (node, argument) if part)


class ResourceError(RuntimeError):
    """The run stopped for lack of memory or disk; the message says what to change and how to continue."""

    exit_code = EXIT_RESOURCE
