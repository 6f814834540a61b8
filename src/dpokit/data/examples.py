"""Canonical examples, what every command works on once rows are read and validated, and the report of a source.

A row of any format (`dpokit.data.formats`) becomes a `PreferenceExample`, an `SFTExample` or a `PromptExample`;
`DataReport` counts what happened to the rows of one source on the way (read, kept, skipped, deduplicated, dropped by
truncation). `row` is always the 0-based index of the source row; `where` prints it as error messages do.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Sequence

Message = dict  # {"role": str, "content": str}


@dataclass(slots=True)
class PromptExample:
    """A prompt to sample completions from (``dpokit eval --prompts``, ``dpokit pairs``): text, with an optional
    `system` prompt (how the model is given both: `dpokit.data.tokenize.model_prompt`), or a message list ending with
    a user (or tool) turn, a system prompt being its first message."""

    prompt: str | list[Message]
    row: int
    system: str | None = None

    def for_model(self, tokenizer) -> str | list[Message]:
        """What the model with `tokenizer` is given (`dpokit.data.tokenize.model_prompt`): the message list, the text,
        or a text with its system prompt, as a conversation when the tokenizer has a chat template."""
        from dpokit.data.tokenize import model_prompt

        return model_prompt(self.prompt, self.system, tokenizer)

    @property
    def model_prompt(self) -> str | list[Message]:
        """What a model whose tokenizer has no chat template is given (`for_model`)."""
        return self.for_model(None)


@dataclass(slots=True)
class PreferenceExample:
    """One preference pair in canonical form.

    Either all text (`prompt`, `chosen`, `rejected` are strings, with an optional `system` prompt:
    `dpokit.data.tokenize.model_prompt` says how the model is given it) or all conversational (`prompt` a message
    list ending with a user/tool turn, `chosen` / `rejected` lists of assistant messages; a system prompt is already
    the first prompt message, `system` is None). `row` is the 0-based index of the source row (`where` prints it as error messages do).
    """

    prompt: str | list[Message]
    chosen: str | list[Message]
    rejected: str | list[Message]
    row: int
    system: str | None = None


@dataclass(slots=True)
class SFTExample:
    """One supervised example: the model learns `completion` given `prompt` (both text, or both message lists).

    `text` rows have ``prompt=""``; `messages` rows have prompt = every message before the last one and completion =
    [the last, assistant, message].
    """

    prompt: str | list[Message]
    completion: str | list[Message]
    row: int
    system: str | None = None


@dataclass
class DataReport:
    """What happened to the rows of one source; counts are rows (pairs), not tokens.

    ``read = kept + skipped + deduplicated + dropped`` holds for every format but ``scored``: `skipped` rows were
    malformed (listed with their reason in `skipped_rows`, ``{"row": 0-based index, "reason": one-line message}``),
    `deduplicated` rows repeated an earlier row exactly, `dropped` rows were dropped during tokenization: a
    completion would have lost every token to truncation, or (`identical_after_truncation`, counted in `dropped`
    too) chosen and rejected had the same token ids once truncated, a pair with no gradient that would still
    count in the loss and the metrics. `truncated_prompt` / `truncated_completion` count kept rows whose prompt / a
    completion was cut. For ``scored`` data `kept` counts the pairs formed (a row can give several) and `unpaired`
    the valid rows that gave none (all scores tied or closer than ``min_score_gap``, or one distinct text).
    """

    read: int
    kept: int
    skipped: int
    deduplicated: int = 0
    truncated_prompt: int = 0
    truncated_completion: int = 0
    dropped: int = 0
    skipped_rows: list[dict] = field(default_factory=list)
    format: str = ""
    source: str = ""
    unpaired: int = 0
    identical_after_truncation: int = 0
    line_numbers: Sequence[int] | None = field(default=None, repr=False)

    @property
    def changed(self) -> bool:
        """Whether any row was skipped, deduplicated, cut or dropped: then the count line is a warning, not a
        routine notice."""
        return any((self.skipped, self.deduplicated, self.dropped, self.truncated_prompt, self.truncated_completion,
                    self.unpaired))

    def where(self, row: int) -> str:
        """Human position of 0-based row `row`: ``file.jsonl:LINE`` for JSON Lines, else ``source row N`` (1-based)."""
        return where(self.source or "<data>", self.line_numbers, row)

    def summary(self) -> str:
        """One line, e.g. ``train.jsonl (standard): 2312 read, 2310 kept, 2 skipped, 0 deduplicated, ...``; for
        ``scored`` data, whose rows become pairs, each count says which it counts:
        ``s.jsonl (scored): 100 rows read, 0 skipped, 3 rows without a scored pair; 291 pairs kept, ...``."""
        if self.format == "scored":
            counts = (f"{self.read} rows read, {self.skipped} skipped, {self.unpaired} rows without a scored pair; "
                      f"{self.kept} pairs kept, {self.deduplicated} deduplicated")
        else:
            counts = f"{self.read} read, {self.kept} kept, {self.skipped} skipped, {self.deduplicated} deduplicated"
        return (
            f"{self.source or '<data>'} ({self.format}): {counts}, {self.dropped} dropped by truncation"
            + (f" ({self.identical_after_truncation} of them with chosen identical to rejected once tokenized and cut)"
               if self.identical_after_truncation else "")
            + f", {self.truncated_prompt} prompts truncated, {self.truncated_completion} with a completion truncated"
        )


def where(source: str, line_numbers: Sequence[int] | None, row: int) -> str:
    """Where 0-based row `row` of `source` is, as error messages print it: ``file.jsonl:LINE`` when the line numbers
    are known (JSON Lines), else ``source row N`` (1-based)."""
    if line_numbers is not None:
        return f"{source}:{line_numbers[row]}"
    return f"{source} row {row + 1}"


def prompt_key(example) -> str:
    """Key equal for examples (pairs, SFT examples, prompts) with the same prompt and system prompt."""
    return json.dumps([example.system, example.prompt], ensure_ascii=False)


def example_key(example) -> str:
    """A text key equal for exactly-equal examples (prompt, completions, system); used for deduplication."""
    values = {f.name: getattr(example, f.name) for f in fields(example) if f.name != "row"}
    return json.dumps(values, sort_keys=True, ensure_ascii=False)


def example_digest(example) -> bytes:
    """128-bit BLAKE2 digest of `example_key`: deduplicating a million pairs then remembers 16 bytes per pair, not a
    second copy of all their text (a collision, ~2**-64 even at 2**32 pairs, is not a practical concern)."""
    return hashlib.blake2b(example_key(example).encode("utf-8"), digest_size=16).digest()
