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


class WriteError(DpokitError):
    """A file or directory could not be written (a full disk, an I/O error, a lost permission): the message names the
    path and the OS's reason; what was half-written is removed. Not a user mistake, hence its own exit code."""

    exit_code = 1


class Interrupted(DpokitError):
    """The run was stopped by a signal (SIGINT, SIGTERM); the message names the step and the last checkpoint. The
    exit code is the shell's for that signal (128 + its number)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class Terminated(BaseException):
    """SIGTERM outside a training loop: like KeyboardInterrupt (a BaseException, so no `except Exception` in library
    code swallows it), turned by the CLI into one line and exit code 143."""
