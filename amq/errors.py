"""User-facing errors: raised for bad settings, reported as one line with a non-zero exit."""


class ConfigError(ValueError):
    """A setting is invalid. The message names the setting and what would be valid."""

    def __init__(self, setting: str, problem: str, valid: str | None = None) -> None:
        self.setting = setting
        msg = f"{setting}: {problem}"
        if valid:
            msg += f" (valid: {valid})"
        super().__init__(msg)
