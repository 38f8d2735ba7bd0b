"""User-facing errors: reported as one line with a non-zero exit, never as a traceback.

Exit codes: 2 for a bad setting (`ConfigError`), 3 when the machine ran out of something the run
needs (`ResourceError`: memory, disk); an interrupted run exits 128 + the signal number
(`amq.interrupts`).
"""

EXIT_CONFIG = 2
EXIT_RESOURCE = 3


class ConfigError(ValueError):
    """A setting is invalid. The message names the setting and what would be valid."""

    exit_code = EXIT_CONFIG

    def __init__(self, setting: str, problem: str, valid: str | None = None) -> None:
        self.setting = setting
        msg = f"{setting}: {problem}"
        if valid:
            msg += f" (valid: {valid})"
        super().__init__(msg)


class ResourceError(RuntimeError):
    """The run stopped for lack of memory or disk; the message says what to change and how to continue."""

    exit_code = EXIT_RESOURCE
