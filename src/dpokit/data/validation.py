"""Checking the fields of one row: the rules every format's parser (`dpokit.data.formats`) is built from.

Each check returns the field's value in canonical form or raises `RowProblem` naming the field (a column, or a path
into it such as ``prompt[2].role``) and what is wrong; the row loop turns that into ``file:LINE: field 'x': reason``.
An empty string is a missing value; a string of whitespace is kept.
"""

from __future__ import annotations

from typing import Any

from dpokit.data.examples import Message
from dpokit.fileio import json_type_name

ROLES = ("system", "user", "assistant", "tool")
INPUT_COLUMNS = ("input", "context")  # Alpaca-style extra material, folded into the prompt (see `fold_input`)


class RowProblem(Exception):
    """A malformed row; `field` is the column (or message path such as ``prompt[2].role``), or None for the row."""

    def __init__(self, field_name: str | None, reason: str):
        super().__init__(reason)
        self.field = field_name
        self.reason = reason


def check_unicode(value: str, name: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        # JSON can spell lone surrogates ("\ud800"); no tokenizer can encode them.
        raise RowProblem(name, f"invalid Unicode (lone surrogate U+{ord(value[e.start]):04X} at character {e.start + 1})") from None


def text_value(row: dict, name: str, *, allow_empty: bool = False) -> str:
    value = row.get(name)
    if value is None:
        raise RowProblem(name, "missing")
    if not isinstance(value, str):
        raise RowProblem(name, f"expected a string, got {json_type_name(value)}")
    if value == "" and not allow_empty:
        raise RowProblem(name, "empty string")
    check_unicode(value, name)
    return value


def optional_text(row: dict, name: str) -> str | None:
    if row.get(name) is None or row.get(name) == "":
        return None
    return text_value(row, name)


def _objects(items: list, name: str, expected: str):
    """(path, object) for each item of a list whose items must be objects; `expected` says what kind."""
    for i, item in enumerate(items):
        where = f"{name}[{i}]"
        if not isinstance(item, dict):
            raise RowProblem(where, f"expected {expected}, got {json_type_name(item)}")
        yield where, item


def _required(obj: dict, key: str, where: str) -> Any:
    value = obj.get(key)
    if value is None:
        raise RowProblem(f"{where}.{key}", "missing")
    return value


def message_list(value: Any, name: str) -> list[Message]:
    """Validate a message list (shape, roles, content types); returns plain ``{"role", "content"}`` dicts."""
    if value is None:
        raise RowProblem(name, "missing")
    if not isinstance(value, list):
        raise RowProblem(name, f"expected a list of messages, got {json_type_name(value)}")
    if not value:
        raise RowProblem(name, "empty list of messages")
    out = []
    for i, (where, msg) in enumerate(_objects(value, name, "a message object")):
        role = _required(msg, "role", where)
        if role not in ROLES:
            raise RowProblem(f"{where}.role", f"unknown role {role!r} (expected {', '.join(ROLES)})")
        if role == "system" and i != 0:
            raise RowProblem(f"{where}.role", "a system message must come first")
        content = _required(msg, "content", where)
        if isinstance(content, list):
            content = text_parts(content, f"{where}.content")
        if not isinstance(content, str):
            raise RowProblem(f"{where}.content", f"expected a string, got {json_type_name(content)}")
        check_unicode(content, f"{where}.content")
        out.append({"role": role, "content": content})
    return out


def text_parts(parts: list, name: str) -> str:
    """Content given as parts ``[{"type": "text", "text": ...}, ...]`` (the OpenAI / HF multimodal message shape) ->
    their texts joined with "\n". Only text parts: an image or audio part cannot be dropped quietly (the reply may
    be about it), and dpokit trains text-only LMs."""
    if not parts:
        raise RowProblem(name, "empty list of content parts")
    texts = []
    for where, part in _objects(parts, name, 'a text part {"type": "text", "text": ...}'):
        kind = _required(part, "type", where)
        if kind != "text":
            raise RowProblem(where, f"{kind} parts are not supported: dpokit trains text-only LMs")
        text = part.get("text")
        if not isinstance(text, str):
            raise RowProblem(f"{where}.text", "missing" if text is None else f"expected a string, got {json_type_name(text)}")
        texts.append(text)
    return "\n".join(texts)


def prompt_messages(messages: list[Message], name: str) -> list[Message]:
    if all(m["role"] == "system" for m in messages):
        raise RowProblem(name, "no user message")
    if messages[-1]["role"] not in ("user", "tool"):
        raise RowProblem(f"{name}[{len(messages) - 1}].role",
                          f"the prompt must end with a user (or tool) message, got {messages[-1]['role']!r}")
    return messages


def assistant_messages(messages: list[Message], name: str) -> list[Message]:
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            raise RowProblem(f"{name}[{i}].role", f"expected 'assistant', got {m['role']!r}")
        if m["content"] == "":
            raise RowProblem(f"{name}[{i}].content", "empty string")
    return messages


def with_system(row: dict, prompt: list[Message]) -> list[Message]:
    """Fold an optional `system` column into a conversational prompt as its first message."""
    system = optional_text(row, "system")
    if system is None:
        return prompt
    if prompt[0]["role"] == "system":
        raise RowProblem("system", "row has both a 'system' column and a system message in 'prompt'")
    return [{"role": "system", "content": system}] + prompt


def split_conversation(messages: list[Message], name: str) -> tuple[list[Message], list[Message]]:
    """Whole conversation -> (prompt = messages before the trailing assistant turn(s), those assistant messages)."""
    k = len(messages)
    while k > 0 and messages[k - 1]["role"] == "assistant":
        k -= 1
    if k == len(messages):
        raise RowProblem(f"{name}[{len(messages) - 1}].role",
                          f"the conversation must end with an assistant message, got {messages[-1]['role']!r}")
    if k == 0:
        raise RowProblem(name, "the conversation has no user message before the assistant reply")
    return prompt_messages(messages[:k], name), assistant_messages(messages[k:], name)


def fold_input(row: dict, prompt):
    """Append an ``input``/``context`` column to the prompt: ``prompt + "\n\n" + input`` (message prompts: to the last
    message's content). Alpaca-style rows keep the material the instruction refers to there."""
    present = [n for n in INPUT_COLUMNS if row.get(n) not in (None, "")]
    if not present:
        return prompt
    if len(present) > 1:
        raise RowProblem("context", "row has both an 'input' and a 'context' column; keep one")
    extra = text_value(row, present[0])
    if isinstance(prompt, str):
        return f"{prompt}\n\n{extra}"
    return prompt[:-1] + [{**prompt[-1], "content": f"{prompt[-1]['content']}\n\n{extra}"}]


def not_identical(chosen, rejected) -> None:
    if chosen == rejected:
        raise RowProblem("rejected", "identical to 'chosen'")


def finite_number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowProblem(name, f"expected a number, got {json_type_name(value)}")
    if value != value or value in (float("inf"), float("-inf")):
        raise RowProblem(name, f"expected a finite number, got {value}")
    return float(value)
