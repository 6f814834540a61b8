"""Command-line options shared by every dpokit command: the parser, and option types that check a declared range.

`Parser` is argparse whose mistakes (a missing or unknown option, a value of the wrong kind) are a `ConfigError`,
which the command line prints as one line with exit code 2, instead of a usage block and `SystemExit`. A numeric
option is declared with its range where the parser declares it (``type=positive_int``, ``type=number("(0, 1]")``),
so that ``--batch_size 0`` is refused as it is read, naming the option, before any file or model is loaded; the
ranges are written as the config fields' are (`dpokit.config.Range`: ``[1, inf)``, ``(0, 1]``).
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Optional

from dpokit.settings import parse_range as _parse_range
from dpokit.errors import ConfigError


class Number:
    """An option type: an int (or float) in `range_text`; out of range or not a number, a ConfigError naming the
    option (`Parser` tells each type its option's name)."""

    def __init__(self, kind: type, range_text: str, option: Optional[str] = None):
        self.kind, self.range, self.option = kind, _parse_range(range_text), option

    def named(self, option: str) -> "Number":
        return Number(self.kind, self.range.text, option)

    def __call__(self, text: str):
        what = "an integer" if self.kind is int else "a number"
        try:
            value = self.kind(text)
        except ValueError:
            value = None
        if value is None or value not in self.range:
            raise ConfigError(f"{self.option or 'the value'} must be {what} {self.range.describe()} (got {text})")
        return value


def integer(range_text: str) -> Number:
    return Number(int, range_text)


def number(range_text: str) -> Number:
    return Number(float, range_text)


positive_int = integer("[1, inf)")
positive_float = number("(0, inf)")
seed = integer("[0, 4294967295]")  # numpy's seeds, as the config's `seed`
top_p = number("(0, 1]")


def json_object(text: str) -> dict:
    """A JSON object option (``--column_map '{"question": "prompt"}'``); argparse names the option in the error."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"question\": \"prompt\"}}', got {text!r}")
    return value


class Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError (one line, exit 2 through the command line) instead of printing its usage and
    exiting; `--help` still prints the help.

    A path option declares its role where it is declared: ``reads=True`` (a file or directory the command reads, or
    updates in place, like an annotation database) or ``writes=True`` (one it writes). Parsing applies
    `dpokit.fileio.refuse_overlap` to them, so no command can write over what it reads, or write two outputs to one
    path, whatever its own code forgets; a command that fills in a path after parsing (a default output name) sets
    it on the namespace and calls `check_paths` again."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.path_options: list[tuple[str, str, bool]] = []  # (dest, label, writes)

    def error(self, message: str):
        raise ConfigError(message)

    def add_argument(self, *names: str, reads: bool = False, writes: bool = False, **kwargs: Any):
        if kwargs.get("type") in (int, float):
            # Every numeric option declares its range where it is declared (type=positive_int, number("(0, 1]")):
            # a bare int or float would let --batch_size 0 or --lease_minutes nan through to a traceback.
            raise TypeError(f"option {names[0]}: declare its range (dpokit.options.integer/number), not type=int/float")
        if isinstance(kwargs.get("type"), Number):
            kwargs["type"] = kwargs["type"].named(names[0])
        action = super().add_argument(*names, **kwargs)
        if reads or writes:
            label = action.option_strings[0] if action.option_strings else (action.metavar or action.dest.upper())
            self.path_options.append((action.dest, label, writes))
        return action

    def parse_known_args(self, args: Any = None, namespace: Any = None):
        parsed, rest = super().parse_known_args(args, namespace)
        self.check_paths(parsed)
        return parsed, rest

    def check_paths(self, parsed: argparse.Namespace) -> None:
        """`refuse_overlap` over the declared path options."""
        from dpokit.fileio import refuse_overlap

        outputs = {label: getattr(parsed, dest, None) for dest, label, writes in self.path_options if writes}
        inputs = {label: getattr(parsed, dest, None) for dest, label, writes in self.path_options if not writes}
        refuse_overlap(outputs, inputs)
