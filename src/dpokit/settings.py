"""How a settings dataclass (a config, a loss's `LossParams`) is declared, checked and read from text.

A field declares its range or its choices next to it (`field(metadata={"range": "[0, 1)"})`, `{"choices": ...}`), and
its documentation as the string under it. `check_settings` checks every field against its declaration once, when the
object is made, then the object's own `_check()` for the combinations; `coerce` turns YAML or command-line text into
the field's type; `field_docs` reads the documentation back for `--help`. The declarations themselves are in
`dpokit.config`.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import math
import os
import re
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any, Optional, Union

import yaml

from dpokit.errors import ConfigError


# --------------------------------------------------------------------------------------------------------------------
# Checking settings: each field's type and declared range or choices, then the combinations, once


@dataclass(frozen=True)
class Range:
    """An interval of finite numbers written as in mathematics, e.g. "[0, 1)" or "(0, inf)" (``inf`` for no bound):
    NaN and the infinities are never in it."""

    text: str
    low: float
    high: float
    low_closed: bool
    high_closed: bool

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        return above and below

    def describe(self) -> str:
        """The range as the end of a sentence "x must be ...": "> 0", ">= 1", "in [0, 0.5]", "a finite number"."""
        def number(x: float) -> str:
            return str(int(x)) if x.is_integer() else str(x)

        if math.isinf(self.low) and math.isinf(self.high):
            return "a finite number"
        if math.isinf(self.high):
            return f"{'>=' if self.low_closed else '>'} {number(self.low)}"
        if math.isinf(self.low):
            return f"{'<=' if self.high_closed else '<'} {number(self.high)}"
        return f"in {self.text}"

    def __str__(self) -> str:
        return self.text


@functools.lru_cache(maxsize=None)
def parse_range(text: str) -> Range:
    match = re.fullmatch(r"([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])", text)
    if match is None:
        raise ValueError(f"bad range {text!r}; write it like [0, 1) or (0, inf)")  # a bug in a field declaration
    return Range(text, float(match[2]), float(match[3]), match[1] == "[", match[4] == "]")


def _declared(cls: type, name: str) -> typing.Mapping[str, Any]:
    """The metadata of field `name`, from the class that declares it with some: a subclass that only changes a
    default (SFTConfig's learning_rate) keeps its base's range."""
    for klass in cls.__mro__:
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None and f.metadata:
            return f.metadata
    return {}


def declared_range(cls: type, name: str) -> Range:
    """The range declared for field `name` of `cls`, for code that takes the same setting as an argument."""
    return parse_range(_declared(cls, name)["range"])


def _check_number(name: str, value: Any, allowed: Range, fractions: bool, nullable: bool) -> None:
    if fractions:
        # An interval in optimizer steps: a count, or a fraction of the run's steps (as transformers v5 reads it).
        if not (0 < value < 1 or (float(value).is_integer() and value in allowed)):
            raise ConfigError(f"{name} must be an integer {allowed.describe()} or a fraction of the run's steps in "
                              f"(0, 1) (got {value})")
        return
    if value not in allowed:
        finite = "" if math.isfinite(value) or allowed.describe() == "a finite number" else "a finite number "
        raise ConfigError(f"{name} must be {finite}{allowed.describe()}{' or null' if nullable else ''} (got {value})")


def _check_field(obj: Any, f: dataclasses.Field) -> None:
    """One field: its type (a config made in Python is not read from text, so nothing converted its values), then
    the choices or range declared with it; a list's range applies to each element."""
    value = getattr(obj, f.name)
    rule = _declared(type(obj), f.name)
    if callable(value) and rule.get("callables"):
        return  # a function given in place of a name (a loss): the object's own `_check` decides
    converted = coerce(f.name, value, f.type)
    if isinstance(value, str) and not isinstance(converted, (str, list)):
        raise ConfigError(f"{f.name}: expected {type(converted).__name__}, got the string {value!r}")
    if not _same_setting(value, converted):
        raise ConfigError(f"{f.name}: expected {describe(f.type)}, got {value!r}")
    if converted is not value:
        # The value as the YAML path would hold it (3 -> 3.0 for a float, a path -> its text, a tuple or the
        # command line's "a,b" -> a list), so that the config is written back and compared as it was read.
        setattr(obj, f.name, converted)
        if not isinstance(value, (int, float)):
            value = converted  # a number is checked, and named in errors, as the user wrote it
    if value is None or not rule:
        return
    if "choices" in rule and value not in rule["choices"]:
        choices = rule["choices"]
        raise ConfigError(f"{f.name}: {value!r} is not one of {', '.join(choices)}{closest(str(value), choices)}")
    if "range" in rule:
        allowed = parse_range(rule["range"])
        if isinstance(value, list):
            for i, item in enumerate(value):
                _check_number(f"{f.name}[{i}]", item, allowed, False, False)
        else:
            nullable = type(None) in typing.get_args(annotation_of(f.type))
            _check_number(f.name, value, allowed, rule.get("fractions", False), nullable)


def _same_setting(value: Any, converted: Any) -> bool:
    """Whether `coerce` only changed the form of a Python value, not what it says: an int for a float, a path for
    its text, a tuple for a list, a list given as comma-separated text; not 3 for a string, nor "x" for a number."""
    if converted is value or converted == value:
        return True
    if isinstance(value, float) and isinstance(converted, float):
        return math.isnan(value) and math.isnan(converted)  # NaN: refused by the range, with the range's words
    if isinstance(value, os.PathLike):
        return os.fspath(value) == converted
    if isinstance(value, tuple):
        return list(value) == converted
    return isinstance(value, str) and isinstance(converted, list)


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
               dict: "a mapping"}


def describe(annotation: Any) -> str:
    """A field's type in words, for "expected ..." errors: "a number", "a string or a list", "an integer or null"."""
    annotation = annotation_of(annotation)
    args = (typing.get_args(annotation) if typing.get_origin(annotation) in (Union, types.UnionType)
            else (annotation,))
    words = [_TYPE_WORDS.get(typing.get_origin(a) or a, getattr(a, "__name__", str(a)))
             for a in args if a is not type(None)]
    return " or ".join(words + (["null"] if type(None) in args else []))


def check_settings(obj: Any) -> None:
    """Check a settings dataclass (a config, or a loss's LossParams), once, when it is made: every field alone, then
    `obj._check()` for the combinations. Each problem is a one-line ConfigError naming the field. The values that
    passed are remembered, so that handing the object on (`ensure_checked`) does not check them again."""
    for f in dataclasses.fields(obj):
        _check_field(obj, f)
    obj._check()
    mark_checked(obj)


def _values(obj: Any) -> tuple:
    return dataclasses.astuple(obj)  # a deep copy, so that a list changed in place counts as changed


def mark_checked(obj: Any) -> None:
    obj.__dict__["_checked_values"] = _values(obj)


def ensure_checked(obj: Any) -> None:
    """Check `obj` again only if a field was changed since it was checked (e.g. by hand after it was made)."""
    if obj.__dict__.get("_checked_values") != _values(obj):
        check_settings(obj)


# --------------------------------------------------------------------------------------------------------------------
# Reading settings from text (YAML, the command line) and their documentation


def field_docs(cls: type) -> dict[str, str]:
    """The documentation string under each field, from the source of `cls` and its bases (subclass wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def closest(name: str, valid) -> str:
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def coerce(name: str, value: Any, annotation: Any) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise ConfigError naming the field."""
    annotation = annotation_of(annotation)
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        # Order matters for text from the command line: "3" is an int before a str, "[a, b]" a list before a str,
        # but a plain "ipo" stays a str rather than becoming the one-element list a comma split would make.
        flow = isinstance(value, str) and value.strip()[:1] in ("[", "{")

        # Text with a comma, for a setting that takes a list, is the list (`--loss_type sigmoid,sft`).
        listed = flow or (isinstance(value, str) and "," in value)

        def rank(a):
            if a in (list, dict) or typing.get_origin(a) in (list, dict):
                return 1 if listed else 3
            return 2 if a is str else 0

        for arg in sorted((a for a in args if a is not type(None)), key=rank):
            try:
                return coerce(name, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        if len(errors) == 1:
            raise ConfigError(errors[0])  # its own words: `loss_weights[1]: expected a number, got 'a'`
        raise ConfigError(f"{name}: expected {describe(annotation)}, got {value!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value))
        except ValueError:
            raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if annotation is str:
        if isinstance(value, (dict, list, tuple)):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return str(value)
    if annotation in (list, dict) or origin in (list, dict):
        target = origin or annotation
        if isinstance(value, str):
            # Command line: YAML/JSON flow syntax ("[a, b]", "{a: b}") or, for lists, comma-separated values.
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError:
                parsed = value
            if target is list and not isinstance(parsed, list):
                parsed = [v.strip() for v in value.split(",") if v.strip()]
            value = parsed
        if target is list and isinstance(value, tuple):
            value = list(value)  # Python code's other sequence: written to YAML as the list it is
        if not isinstance(value, target):
            raise ConfigError(f"{name}: expected {_TYPE_WORDS[target]}, got {value!r}")
        if target is list and args:  # list[float]: each element converted, named by its index
            value = [coerce(f"{name}[{i}]", item, args[0]) for i, item in enumerate(value)]
        return value
    return value


def is_null(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null"))


def annotation_of(annotation: Any) -> Any:
    if isinstance(annotation, str):
        return eval(annotation, vars(typing), {"Optional": Optional, "Union": Union})  # noqa: S307 (own code)
    return annotation
