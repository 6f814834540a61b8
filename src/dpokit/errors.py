"""User-facing errors.

Every mistake a user can make (bad config, bad data, an option that cannot work in this setting) raises a
`DpokitError` subclass whose message is one line naming what is wrong and where. The CLI prints that line and exits
with code 2; anything else is a bug and keeps its traceback.
"""


class DpokitError(Exception):
    """A user-facing error: one line, no traceback from the CLI (exit code 2)."""


class ConfigError(DpokitError):
    """An unknown, mistyped or incompatible configuration value."""


class DataError(DpokitError):
    """A dataset that cannot be used; the message names the file, the row and the field."""
