"""Reading preference / SFT data and turning its rows into canonical examples.

Pipeline: `load_rows(source)` -> rows (a list of dicts or a `datasets.Dataset`) -> `preference_examples(rows, ...)`
or `sft_examples(rows, ...)` -> validated, canonical `PreferenceExample` / `SFTExample` objects plus a `DataReport`.

Preference formats (`dataset_format=`; `auto` detects them from the columns and the first row's types):

- ``standard``: ``prompt``, ``chosen``, ``rejected`` strings, optional ``system`` string.
- ``conversational``: ``prompt`` a list of messages ``{"role", "content"}`` (system/user/assistant/tool) ending with a
  user (or tool) message; ``chosen`` / ``rejected`` lists of assistant messages. An optional ``system`` string column
  becomes a leading system message.
- ``implicit_conversational``: only ``chosen`` / ``rejected``, each a whole conversation (message list). The prompt is
  the messages before the trailing assistant turn; both conversations must share it exactly. A text ``prompt``
  column beside such conversations (UltraFeedback-binarized) is redundant, as TRL treats it: the prompt still comes
  from the conversations, and the text must equal one of its user turns (else the row is an error).
- ``implicit_hh``: only ``chosen`` / ``rejected``, each a raw Anthropic HH transcript
  ``"\\n\\nHuman: ... \\n\\nAssistant: ..."``. The data stays text: the prompt is the transcript up to and including
  the ``"\\n\\nAssistant:"`` marker that answers the last Human turn, the completions are the text after it (see
  `split_hh_transcript`). `parse_hh_transcript` turns a transcript into messages when a chat template is wanted.

- ``scored``: ``prompt`` plus several rated completions, as ``completions``, a list of ``{"text": ..., "score":
  number}``, or as two parallel lists ``responses`` (texts) and ``scores`` (numbers). UltraFeedback rows work as they
  are: a completion's text may be under ``response``, its score under ``overall_score`` or ``fine-grained_score``, or
  come from ``annotations: {aspect: {"Rating": "4", ...}}`` as the MEAN of the numeric ratings (numeric strings count,
  "N/A" is left out). A completion's score is read from the first of ``score``, ``overall_score``,
  ``fine-grained_score``, ``annotations`` it has, and every completion of a row must use the same one (a 1-10
  overall score is not comparable to a 1-5 rating). Pairs are formed per `pair_strategy`: ``best_vs_worst``
  (one pair per row), ``best_vs_rest`` (the best against each other completion) or ``all_pairs`` (every two
  completions, higher score chosen); a pair needs ``score_chosen - score_rejected >= min_score_gap`` AND a strictly
  higher chosen score, so ties never become pairs. Among equal scores the first completion listed is used. A text
  listed more than once in a row counts once, at its first place, scored with the MEAN of its scores: pairs are
  chosen among distinct texts, so a text is never paired with itself nor both above and below another (a row with
  one distinct text gives no pair and counts as unpaired).

An ``input`` (or ``context``) column, as in Alpaca-style data, is folded into the prompt of the standard, scored
and (SFT) prompt_completion formats as ``prompt + "\n\n" + input`` (for a message prompt: appended the same way to
the last prompt message); an empty input adds nothing.

Message ``content`` is a string, or a list of text parts ``[{"type": "text", "text": ...}, ...]`` (the OpenAI / HF
multimodal message shape holding text only), read as the parts' texts joined with ``"\n"``. Any other part (image,
audio, ...) is refused naming it: dpokit trains text-only LMs.

SFT formats: ``prompt_completion`` (``prompt`` / ``completion`` strings), ``conversational_prompt_completion``
(message lists), ``messages`` (one conversation; the last message is the completion, which must be an assistant
message) and ``text`` (one string; empty prompt, everything is trained on).

Row numbers. `PreferenceExample.row` / `SFTExample.row` is the 0-based index of the row in the loaded rows (what
`rows[i]` returns). Error messages print 1-based positions: ``train.jsonl:17`` is line 17 of a JSON Lines file
(blank lines are skipped but still counted), ``train.csv row 17`` is the 17th data row (header not counted) of any
other source. `DataReport.where(row)` turns a 0-based row index into that text.

Validation. Every user mistake (missing or empty field, wrong type, chosen identical to rejected, unknown role or bad
turn order, invalid Unicode) is a one-line `DataError` naming the source, the row and the field. With
``on_bad_rows="error"`` the rows are all checked first and one error names the first problem and how many more there
are; with ``on_bad_rows="skip"`` bad rows are dropped and listed, with their reason, in `DataReport.skipped_rows`.
An empty string is a missing value; a string of whitespace is kept (in HH the chosen reply " " - saying nothing - is
a real preference).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import re
import zlib
from array import array
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from dpokit.errors import ConfigError, DataError

PREFERENCE_FORMATS = ("standard", "conversational", "implicit_conversational", "implicit_hh", "scored")
PAIR_STRATEGIES = ("best_vs_worst", "best_vs_rest", "all_pairs")
INPUT_COLUMNS = ("input", "context")  # Alpaca-style extra material, folded into the prompt (see `_fold_input`)
SCORED_TEXT_KEYS = ("text", "response")  # where a scored completion keeps its text, in this order of preference
# Where a scored completion keeps its score, in this order of preference; "annotations" (UltraFeedback's per-aspect
# ratings) is used last, as the mean of its numeric ratings (see `_annotation_score`).
SCORED_SCORE_KEYS = ("score", "overall_score", "fine-grained_score", "annotations")
SFT_FORMATS = ("prompt_completion", "conversational_prompt_completion", "messages", "text")
ROLES = ("system", "user", "assistant", "tool")
ON_BAD_ROWS = ("error", "skip")
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow")
MAX_LISTED_PROBLEMS = 5  # kept on the raised DataError as `.problems`; the message itself names only the first

Message = dict  # {"role": str, "content": str}


# ---------------------------------------------------------------------------------------------------------------
# Canonical examples and the report
# ---------------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class PreferenceExample:
    """One preference pair in canonical form.

    Either all text (`prompt`, `chosen`, `rejected` are strings; the model sees ``system + "\\n\\n" + prompt`` when
    `system` is set) or all conversational (`prompt` a message list ending with a user/tool turn, `chosen` /
    `rejected` lists of assistant messages; a system prompt is already the first prompt message, `system` is None).
    `row` is the 0-based index of the source row (see the module docstring for how messages print it).
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


@dataclass(slots=True)
class PromptExample:
    """A prompt to sample completions from (``dpokit eval --prompts``, ``dpokit pairs``): text, which the model sees
    as ``system + "\\n\\n" + prompt`` when `system` is set, or a message list ending with a user (or tool) turn,
    a system prompt being its first message."""

    prompt: str | list[Message]
    row: int
    system: str | None = None

    @property
    def model_prompt(self) -> str | list[Message]:
        """What the model is given: the text with its system prompt folded in, or the message list."""
        if isinstance(self.prompt, str) and self.system is not None:
            return f"{self.system}\n\n{self.prompt}"
        return self.prompt


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

    def where(self, row: int) -> str:
        """Human position of 0-based row `row`: ``file.jsonl:LINE`` for JSON Lines, else ``source row N`` (1-based)."""
        return _where(self.source or "<data>", self.line_numbers, row)

    def summary(self) -> str:
        """One line, e.g. ``train.jsonl (standard): 2312 read, 2310 kept, 2 skipped, 0 deduplicated, ...``."""
        return (
            f"{self.source or '<data>'} ({self.format}): {self.read} read, {self.kept} kept, {self.skipped} skipped, "
            f"{self.deduplicated} deduplicated, {self.dropped} dropped by truncation"
            + (f" ({self.identical_after_truncation} of them with chosen identical to rejected once tokenized and cut)"
               if self.identical_after_truncation else "")
            + f", {self.truncated_prompt} prompts truncated, {self.truncated_completion} with a completion truncated"
            + (f", {self.unpaired} rows without a scored pair" if self.format == "scored" else "")
        )


class RowList(list):
    """A list of row dicts read from a JSON Lines file that remembers each row's 1-based line number."""

    def __init__(self, rows: Iterable[dict], line_numbers: Sequence[int]):
        super().__init__(rows)
        self.line_numbers = line_numbers


def _where(source: str, line_numbers: Sequence[int] | None, row: int) -> str:
    if line_numbers is not None:
        return f"{source}:{line_numbers[row]}"
    return f"{source} row {row + 1}"


def _one_line(text: str) -> str:
    """Collapse an exception text (pyarrow's are multi-line) into one line."""
    return " ".join(str(text).split())


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def load_rows(source: Any, *, split: str = "train", config_name: Optional[str] = None) -> tuple[list[dict] | Any, str]:
    """Read rows from `source`; returns ``(rows, source_name)``.

    `source` is a path (``.jsonl .json .csv .tsv .parquet .arrow``, each optionally ``.gz``, or a directory written by
    ``datasets.save_to_disk``), a list of dicts, or a ``datasets.Dataset`` / ``DatasetDict`` (`split` picks the split
    of a dict, a ``save_to_disk`` directory or a hub data set; `config_name` is a hub data set's configuration).
    `source_name` is the path as given, ``"<list>"`` or ``"<dataset>"``; it starts every error message.
    JSON Lines are read line by line (rows come back as a `RowList` that remembers line numbers), CSV/TSV with the
    `csv` module (every value a string), Parquet/Arrow/``save_to_disk`` through `datasets`. A file that starts with
    gzip's magic bytes is read as gzip whatever its name (``data.jsonl`` that is really ``data.jsonl.gz``).
    Unreadable input (no such file, invalid JSON or UTF-8, a broken archive) raises a one-line `DataError`.
    """
    import datasets

    if isinstance(source, datasets.DatasetDict):
        return _pick_split(source, split, "<dataset>"), "<dataset>"
    if isinstance(source, datasets.Dataset):
        return source, "<dataset>"
    if isinstance(source, list):
        return source, "<list>"
    if not isinstance(source, (str, os.PathLike)):
        raise DataError(f"cannot read data from a {type(source).__name__}: pass a file path, a list of dicts or a datasets.Dataset")
    path = Path(source)
    name = str(source)
    if path.is_dir():
        return _load_from_disk(path, name, split), name
    if not path.exists():
        if _looks_like_hub_id(name):
            return _load_from_hub(name, split, config_name), name
        raise DataError(f"{name}: no such file or directory")
    suffixes = [s.lower() for s in path.suffixes]
    gz = bool(suffixes) and suffixes[-1] == ".gz"
    kind = (suffixes[-2] if gz and len(suffixes) > 1 else suffixes[-1] if suffixes else "") if suffixes else ""
    if kind not in FILE_SUFFIXES:
        raise DataError(f"{name}: unsupported file type {''.join(path.suffixes) or '(none)'}; expected one of "
                        f"{', '.join(FILE_SUFFIXES)} (optionally .gz) or a datasets save_to_disk directory")
    gz = gz or _starts_like_gzip(path)
    if kind == ".jsonl":
        return _stream_jsonl(path, name, gz), name
    raw = _read_bytes(path, name, gz)
    if kind == ".json":
        return _parse_json(raw, name), name
    if kind in (".csv", ".tsv"):
        return _parse_csv(raw, name, "\t" if kind == ".tsv" else ","), name
    return _read_arrow_like(raw, name, kind), name


def _looks_like_hub_id(name: str) -> bool:
    """`org/name` (or a bare `name`) with no file suffix and nothing that marks a local path."""
    parts = name.split("/")
    return (len(parts) <= 2 and all(parts) and not name.startswith((".", "~"))
            and not Path(parts[-1]).suffix and os.sep not in name.replace("/", ""))


def _load_from_hub(name: str, split: str, config_name: Optional[str] = None):
    """A Hugging Face Hub data set through `datasets.load_dataset` (needs network access, or a local HF cache)."""
    import datasets

    try:
        return datasets.load_dataset(name, config_name, split=split)
    except Exception as exc:  # datasets raises many types (connection, not found, offline mode); all mean "unusable"
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise DataError(f"{name}: no such file or directory, and loading it as a Hub data set failed ({reason})") from None


def _starts_like_gzip(path: Path) -> bool:
    """True when the file begins with gzip's magic bytes 1f 8b: a compressed file that lost its .gz suffix would
    otherwise fail as "invalid UTF-8 (byte 0x8b ...)". No valid UTF-8 text, Parquet or Arrow file starts so.
    An unreadable file gives False; reading it then reports why."""
    try:
        with open(path, "rb") as f:
            return f.read(2) == b"\x1f\x8b"
    except OSError:
        return False


def _read_bytes(path: Path, name: str, gz: bool) -> bytes:
    try:
        if gz:
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{name}: cannot read {'gzip ' if gz else ''}file ({_one_line(e)})") from None


def _decode_line(raw: bytes, name: str, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{name}:{lineno}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None


def _stream_jsonl(path: Path, name: str, gz: bool) -> RowList:
    """Read a JSON Lines file one line at a time, so that only the parsed rows are held, never the file's bytes too
    (a million-pair file would otherwise sit in memory as bytes, as a list of lines and as rows at once)."""
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            return _parse_jsonl(f, name)
    except (OSError, EOFError, zlib.error) as e:  # a gzip stream can turn out broken half-way through
        raise DataError(f"{name}: cannot read {'gzip ' if gz else ''}file ({_one_line(e)})") from None


def _parse_jsonl(lines: Iterable[bytes], name: str) -> RowList:
    """Rows from an iterable of byte lines (a binary file, which splits on b"\\n" only, as JSON Lines does)."""
    rows, numbers = [], array("q")  # 8 bytes per line number instead of a list entry plus an int object
    keys: dict[str, str] = {}
    for lineno, line in enumerate(lines, start=1):
        if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark is not part of the JSON
            line = line[3:]
        text = _decode_line(line[:-1] if line.endswith(b"\n") else line, name, lineno)
        if not text.strip():
            continue  # blank lines carry no row
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{name}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{name}:{lineno}: expected a JSON object, got {_type_name(obj)}")
        # json makes fresh key strings for every line; share one per column name (saves ~50 bytes per key per row).
        rows.append({keys.setdefault(k, k): v for k, v in obj.items()})
        numbers.append(lineno)
    return RowList(rows, numbers)


def _decode_utf8(raw: bytes, name: str) -> tuple[bytes, str]:
    """(bytes without a UTF-8 byte-order mark, their text); undecodable bytes name the file and line."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw, raw.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{name}:{lineno}: invalid UTF-8 (byte 0x{raw[e.start]:02x})") from None


def _parse_json(raw: bytes, name: str) -> list[dict] | RowList:
    """A ``.json`` file holds a JSON array of objects, (as many Hub datasets do) one object per line, or one object
    of columns (`_column_rows`)."""
    raw, text = _decode_utf8(raw, name)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            return _parse_jsonl(io.BytesIO(raw), name)  # JSON Lines under a .json name: a documented form
        raise DataError(f"{name}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(obj, dict):
        columns = _column_rows(obj, name)
        # a single object that is not columns is one row: a one-line JSON Lines file
        return columns if columns is not None else _parse_jsonl(io.BytesIO(raw), name)
    if not isinstance(obj, list):
        raise DataError(f"{name}: expected a JSON array of objects, got {_type_name(obj)}")
    for i, item in enumerate(obj):
        if not isinstance(item, dict):
            raise DataError(f"{name} row {i + 1}: expected a JSON object, got {_type_name(item)}")
    return obj


def _column_rows(obj: dict, name: str) -> list[dict] | None:
    """The rows of a column-oriented object (``{"prompt": [...], "chosen": [...], ...}``, which HF's json loader reads
    as rows), or None when `obj` is one row. Columns: every value is a list and no list holds a message object (a
    dict with a "role": then the object is one conversational row whose message lists may happen to be equally
    long). Columns of different lengths are refused rather than read as a row of nonsense."""
    values = list(obj.values())
    if not values or not all(isinstance(v, list) for v in values):
        return None
    if any(isinstance(item, dict) and "role" in item for v in values for item in v):
        return None
    lengths = {k: len(v) for k, v in obj.items()}
    if len(set(lengths.values())) > 1:
        raise DataError(f"{name}: a JSON object of columns of different lengths "
                        f"({', '.join(f'{k}: {n}' for k, n in lengths.items())}); expected a JSON array of row objects, "
                        "JSON Lines, or columns of equal length")
    return [dict(zip(obj, row)) for row in zip(*values)]


def _parse_csv(raw: bytes, name: str, delimiter: str) -> list[dict]:
    raw, text = _decode_utf8(raw, name)
    # The csv module refuses fields over 128 KiB by default; whole transcripts can be longer.
    csv.field_size_limit(2**31 - 1)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows = []
    try:
        for i, row in enumerate(reader):
            if None in row:  # DictReader files surplus values under the key None
                raise DataError(f"{name} row {i + 1}: {len(reader.fieldnames) + len(row[None])} values but the "
                                f"header has {len(reader.fieldnames)} columns")
            rows.append(row)
    except csv.Error as e:
        raise DataError(f"{name}:{reader.line_num}: invalid {'TSV' if delimiter == chr(9) else 'CSV'} ({_one_line(e)})") from None
    if reader.fieldnames is None:
        raise DataError(f"{name}: empty file (no header row)")
    if len(set(reader.fieldnames)) != len(reader.fieldnames):
        dup = next(c for c in reader.fieldnames if reader.fieldnames.count(c) > 1)
        raise DataError(f"{name}: header has column {dup!r} twice")
    return rows


def _read_arrow_like(raw: bytes, name: str, kind: str):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.table import InMemoryTable

    try:
        if kind == ".parquet":
            table = pq.read_table(pa.BufferReader(raw))
        else:
            # datasets writes Arrow *stream* files; pyarrow/feather write the random-access *file* format. Both are
            # Arrow; read whichever this is (the file format starts with the magic "ARROW1").
            reader = pa.ipc.open_file if raw[:6] == b"ARROW1" else pa.ipc.open_stream
            table = reader(pa.BufferReader(raw)).read_all()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{name}: not a readable {kind[1:]} file ({_one_line(e)})") from None
    return datasets.Dataset(InMemoryTable(table))


def _load_from_disk(path: Path, name: str, split: str):
    import datasets

    if not ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        raise DataError(f"{name}: a directory, but not one written by datasets' save_to_disk (no state.json or dataset_dict.json)")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises a variety of types for a damaged directory
        raise DataError(f"{name}: cannot load the save_to_disk directory ({_one_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        return _pick_split(ds, split, name)
    return ds


def _pick_split(dd, split: str, name: str):
    if split not in dd:
        raise DataError(f"{name}: no split {split!r} (splits: {', '.join(dd.keys())})")
    return dd[split]


# ---------------------------------------------------------------------------------------------------------------
# HH transcripts
# ---------------------------------------------------------------------------------------------------------------

# A turn marker: "Human:" / "Assistant:" at the very start of the text or after a blank line. An inline "Human:"
# (HH has a few replies that quote one) is part of the turn's text, as it is in the original data.
_HH_MARKER = re.compile(r"(?:\A|\n\n)(Human|Assistant):")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}


def split_hh_transcript(text: str) -> tuple[str, str]:
    """Split a raw HH transcript into ``(prompt, completion)`` text with ``prompt + completion == text``.

    The prompt ends with the ``"\\n\\nAssistant:"`` marker that answers the LAST Human turn; the completion is all
    text after it (normally the final assistant turn; in the few HH rows that end with two assistant turns in a row,
    both). Raises ValueError (with a short reason) when `text` has no Human turn followed by an Assistant turn.
    """
    markers = list(_HH_MARKER.finditer(text))
    if not markers or text[: markers[0].start()].strip():
        raise ValueError("not an HH transcript (expected '\\n\\nHuman: ... \\n\\nAssistant: ...')")
    humans = [i for i, m in enumerate(markers) if m.group(1) == "Human"]
    if not humans:
        raise ValueError("HH transcript has no 'Human:' turn")
    answer = next((m for m in markers[humans[-1] + 1:] if m.group(1) == "Assistant"), None)
    if answer is None:
        raise ValueError("HH transcript does not end with an 'Assistant:' turn after its last 'Human:' turn")
    return text[: answer.end()], text[answer.end():]


def parse_hh_transcript(text: str) -> list[Message]:
    """Parse a raw HH transcript into messages ``[{"role": "user"|"assistant", "content": str}, ...]``.

    The content of a turn is the text between its marker and the next one, minus the single space that follows the
    colon, so rendering ``"\\n\\nHuman: " + content`` / ``"\\n\\nAssistant: " + content`` turn by turn gives the
    transcript back. Raises ValueError when `text` does not start with a turn marker.
    """
    markers = list(_HH_MARKER.finditer(text))
    if not markers or text[: markers[0].start()].strip():
        raise ValueError("not an HH transcript (expected '\\n\\nHuman: ... \\n\\nAssistant: ...')")
    messages = []
    for m, nxt in zip(markers, markers[1:] + [None]):
        content = text[m.end(): nxt.start() if nxt is not None else len(text)]
        if content.startswith(" "):
            content = content[1:]
        messages.append({"role": _HH_ROLE[m.group(1)], "content": content})
    return messages


# ---------------------------------------------------------------------------------------------------------------
# Row validation
# ---------------------------------------------------------------------------------------------------------------


class _RowProblem(Exception):
    """A malformed row; `field` is the column (or message path such as ``prompt[2].role``), or None for the row."""

    def __init__(self, field_name: str | None, reason: str):
        super().__init__(reason)
        self.field = field_name
        self.reason = reason


def _type_name(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "integer", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _check_unicode(value: str, name: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        # JSON can spell lone surrogates ("\ud800"); no tokenizer can encode them.
        raise _RowProblem(name, f"invalid Unicode (lone surrogate U+{ord(value[e.start]):04X} at character {e.start + 1})") from None


def _text(row: dict, name: str, *, allow_empty: bool = False) -> str:
    value = row.get(name)
    if value is None:
        raise _RowProblem(name, "missing")
    if not isinstance(value, str):
        raise _RowProblem(name, f"expected a string, got {_type_name(value)}")
    if value == "" and not allow_empty:
        raise _RowProblem(name, "empty string")
    _check_unicode(value, name)
    return value


def _optional_text(row: dict, name: str) -> str | None:
    if row.get(name) is None or row.get(name) == "":
        return None
    return _text(row, name)


def _messages(value: Any, name: str) -> list[Message]:
    """Validate a message list (shape, roles, content types); returns plain ``{"role", "content"}`` dicts."""
    if value is None:
        raise _RowProblem(name, "missing")
    if not isinstance(value, list):
        raise _RowProblem(name, f"expected a list of messages, got {_type_name(value)}")
    if not value:
        raise _RowProblem(name, "empty list of messages")
    out = []
    for i, msg in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(msg, dict):
            raise _RowProblem(where, f"expected a message object, got {_type_name(msg)}")
        role, content = msg.get("role"), msg.get("content")
        if role is None:
            raise _RowProblem(f"{where}.role", "missing")
        if role not in ROLES:
            raise _RowProblem(f"{where}.role", f"unknown role {role!r} (expected {', '.join(ROLES)})")
        if role == "system" and i != 0:
            raise _RowProblem(f"{where}.role", "a system message must come first")
        if content is None:
            raise _RowProblem(f"{where}.content", "missing")
        if isinstance(content, list):
            content = _text_parts(content, f"{where}.content")
        if not isinstance(content, str):
            raise _RowProblem(f"{where}.content", f"expected a string, got {_type_name(content)}")
        _check_unicode(content, f"{where}.content")
        out.append({"role": role, "content": content})
    return out


def _text_parts(parts: list, name: str) -> str:
    """Content given as parts ``[{"type": "text", "text": ...}, ...]`` (the OpenAI / HF multimodal message shape) ->
    their texts joined with "\n". Only text parts: an image or audio part cannot be dropped quietly (the reply may
    be about it), and dpokit trains text-only LMs."""
    if not parts:
        raise _RowProblem(name, "empty list of content parts")
    texts = []
    for i, part in enumerate(parts):
        where = f"{name}[{i}]"
        if not isinstance(part, dict):
            raise _RowProblem(where, f'expected a text part {{"type": "text", "text": ...}}, got {_type_name(part)}')
        kind = part.get("type")
        if kind is None:
            raise _RowProblem(f"{where}.type", "missing")
        if kind != "text":
            raise _RowProblem(where, f"{kind} parts are not supported: dpokit trains text-only LMs")
        text = part.get("text")
        if not isinstance(text, str):
            raise _RowProblem(f"{where}.text", "missing" if text is None else f"expected a string, got {_type_name(text)}")
        texts.append(text)
    return "\n".join(texts)


def _prompt_messages(messages: list[Message], name: str) -> list[Message]:
    if all(m["role"] == "system" for m in messages):
        raise _RowProblem(name, "no user message")
    if messages[-1]["role"] not in ("user", "tool"):
        raise _RowProblem(f"{name}[{len(messages) - 1}].role",
                          f"the prompt must end with a user (or tool) message, got {messages[-1]['role']!r}")
    return messages


def _assistant_messages(messages: list[Message], name: str) -> list[Message]:
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            raise _RowProblem(f"{name}[{i}].role", f"expected 'assistant', got {m['role']!r}")
        if m["content"] == "":
            raise _RowProblem(f"{name}[{i}].content", "empty string")
    return messages


def _with_system(row: dict, prompt: list[Message]) -> list[Message]:
    """Fold an optional `system` column into a conversational prompt as its first message."""
    system = _optional_text(row, "system")
    if system is None:
        return prompt
    if prompt[0]["role"] == "system":
        raise _RowProblem("system", "row has both a 'system' column and a system message in 'prompt'")
    return [{"role": "system", "content": system}] + prompt


def _split_conversation(messages: list[Message], name: str) -> tuple[list[Message], list[Message]]:
    """Whole conversation -> (prompt = messages before the trailing assistant turn(s), those assistant messages)."""
    k = len(messages)
    while k > 0 and messages[k - 1]["role"] == "assistant":
        k -= 1
    if k == len(messages):
        raise _RowProblem(f"{name}[{len(messages) - 1}].role",
                          f"the conversation must end with an assistant message, got {messages[-1]['role']!r}")
    if k == 0:
        raise _RowProblem(name, "the conversation has no user message before the assistant reply")
    return _prompt_messages(messages[:k], name), _assistant_messages(messages[k:], name)


def _fold_input(row: dict, prompt):
    """Append an ``input``/``context`` column to the prompt: ``prompt + "\n\n" + input`` (message prompts: to the last
    message's content). Alpaca-style rows keep the material the instruction refers to there."""
    present = [n for n in INPUT_COLUMNS if row.get(n) not in (None, "")]
    if not present:
        return prompt
    if len(present) > 1:
        raise _RowProblem("context", "row has both an 'input' and a 'context' column; keep one")
    extra = _text(row, present[0])
    if isinstance(prompt, str):
        return f"{prompt}\n\n{extra}"
    return prompt[:-1] + [{**prompt[-1], "content": f"{prompt[-1]['content']}\n\n{extra}"}]


def _not_identical(chosen, rejected) -> None:
    if chosen == rejected:
        raise _RowProblem("rejected", "identical to 'chosen'")


def _standard(row: dict, index: int) -> PreferenceExample:
    prompt, chosen, rejected = _fold_input(row, _text(row, "prompt")), _text(row, "chosen"), _text(row, "rejected")
    _not_identical(chosen, rejected)
    return PreferenceExample(prompt, chosen, rejected, index, _optional_text(row, "system"))


def _conversational(row: dict, index: int) -> PreferenceExample:
    prompt = _fold_input(row, _with_system(row, _prompt_messages(_messages(row.get("prompt"), "prompt"), "prompt")))
    chosen = _assistant_messages(_messages(row.get("chosen"), "chosen"), "chosen")
    rejected = _assistant_messages(_messages(row.get("rejected"), "rejected"), "rejected")
    _not_identical(chosen, rejected)
    return PreferenceExample(prompt, chosen, rejected, index)


def _implicit_conversational(row: dict, index: int) -> PreferenceExample:
    prompt, chosen = _split_conversation(_messages(row.get("chosen"), "chosen"), "chosen")
    prompt_r, rejected = _split_conversation(_messages(row.get("rejected"), "rejected"), "rejected")
    if prompt != prompt_r:
        at = next((i for i, (a, b) in enumerate(zip(prompt, prompt_r)) if a != b), min(len(prompt), len(prompt_r)))
        raise _RowProblem("rejected", f"conversation differs from 'chosen' at message {at}, before the final assistant turn")
    if row.get("prompt") is not None:
        # A redundant text prompt beside whole conversations: it must be one of their user turns, or the row says
        # two different things and neither reading is safe.
        text = _text(row, "prompt").strip()
        if not any(m["role"] == "user" and m["content"].strip() == text for m in prompt):
            raise _RowProblem("prompt", "does not match any user turn of the conversation in 'chosen' (with whole "
                                        "conversations in chosen/rejected the prompt is read from them)")
    _not_identical(chosen, rejected)
    return PreferenceExample(_with_system(row, prompt), chosen, rejected, index)


def _implicit_hh(row: dict, index: int) -> PreferenceExample:
    parts = {}
    for name in ("chosen", "rejected"):
        text = _text(row, name)
        try:
            parts[name] = split_hh_transcript(text)
        except ValueError as e:
            raise _RowProblem(name, str(e)) from None
    (prompt, chosen), (prompt_r, rejected) = parts["chosen"], parts["rejected"]
    if prompt != prompt_r:
        at = next((i for i, (a, b) in enumerate(zip(prompt, prompt_r)) if a != b), min(len(prompt), len(prompt_r)))
        raise _RowProblem("rejected", f"transcript differs from 'chosen' at character {at + 1}, before the final Assistant turn")
    if chosen == "":
        raise _RowProblem("chosen", "empty final Assistant turn")
    if rejected == "":
        raise _RowProblem("rejected", "empty final Assistant turn")
    _not_identical(chosen, rejected)
    return PreferenceExample(prompt, chosen, rejected, index)


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _RowProblem(name, f"expected a number, got {_type_name(value)}")
    if value != value or value in (float("inf"), float("-inf")):
        raise _RowProblem(name, f"expected a finite number, got {value}")
    return float(value)


def _annotation_score(annotations: Any, name: str) -> float:
    """UltraFeedback ``annotations``: ``{aspect: {"Rating": "4", "Rationale": ...}, ...}`` -> the mean of the
    numeric ratings (numbers or numeric strings); non-numeric ratings such as "N/A" are left out of the mean."""
    if not isinstance(annotations, dict) or not annotations:
        raise _RowProblem(name, f"expected an object of aspect ratings, got {_type_name(annotations)}")
    ratings = []
    for aspect, value in annotations.items():
        if not isinstance(value, dict) or "Rating" not in value:
            raise _RowProblem(f"{name}.{aspect}", "expected an object with a 'Rating'")
        rating = value["Rating"]
        if isinstance(rating, str):
            try:
                rating = float(rating)
            except ValueError:
                continue  # "N/A": the annotator gave no rating for this aspect
        if isinstance(rating, (int, float)) and not isinstance(rating, bool) and rating == rating \
                and rating not in (float("inf"), float("-inf")):
            ratings.append(float(rating))
    if not ratings:
        raise _RowProblem(name, "no numeric Rating in any aspect")
    return sum(ratings) / len(ratings)


def _scores(items: list[dict], name: str) -> list[float]:
    """One score per completion, all read from the same key (module docstring): scores from different scales (a
    1-10 overall_score against a 1-5 fine-grained mean) must not be compared."""
    keys = [next((k for k in SCORED_SCORE_KEYS if item.get(k) is not None), None) for item in items]
    for i, key in enumerate(keys):
        if key is None:
            raise _RowProblem(f"{name}[{i}].score", "missing")
        if key != keys[0]:
            raise _RowProblem(f"{name}[{i}].{key}", f"scored by {key!r} but {name}[0] by {keys[0]!r}; use one score key per row")
    if keys[0] == "annotations":
        return [_annotation_score(item["annotations"], f"{name}[{i}].annotations") for i, item in enumerate(items)]
    return [_number(item[keys[0]], f"{name}[{i}].{keys[0]}") for i, item in enumerate(items)]


def _scored_text(value: Any, name: str, conversational: bool):
    if conversational:
        if isinstance(value, str):
            value = [{"role": "assistant", "content": value}]  # a plain reply to a message prompt is one assistant turn
        return _assistant_messages(_messages(value, name), name)
    return _text({name: value}, name)


def _scored_completion(item: Any, name: str, conversational: bool):
    if not isinstance(item, dict):
        raise _RowProblem(name, f"expected an object with text and score, got {_type_name(item)}")
    key = next((k for k in SCORED_TEXT_KEYS if item.get(k) is not None), "text")
    return _scored_text(item.get(key), f"{name}.{key}", conversational)


def scored_pairs(scores: list[float], strategy: str, min_score_gap: float) -> list[tuple[int, int]]:
    """(chosen index, rejected index) pairs from completion scores.

    A pair needs ``scores[c] > scores[r]`` and ``scores[c] - scores[r] >= min_score_gap``. ``best_vs_worst``: the
    first best against the first worst; ``best_vs_rest``: the first best against every other; ``all_pairs``: every
    two completions. Pairs come in the order of the completions.
    """
    def ok(c, r):
        return scores[c] > scores[r] and scores[c] - scores[r] >= min_score_gap

    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    if strategy == "best_vs_worst":
        worst = min(range(len(scores)), key=lambda i: (scores[i], i))
        return [(best, worst)] if ok(best, worst) else []
    if strategy == "best_vs_rest":
        return [(best, r) for r in range(len(scores)) if ok(best, r)]
    return [(c, r) if scores[c] > scores[r] else (r, c)
            for c in range(len(scores)) for r in range(c + 1, len(scores)) if ok(c, r) or ok(r, c)]


def _parallel_scored(row: dict, conversational: bool) -> tuple[list, list[float]]:
    """``responses`` / ``scores``: two lists of the same length, the i-th score rating the i-th response."""
    responses, scores = row.get("responses"), row.get("scores")
    if responses is None:
        raise _RowProblem("responses", "missing")
    if not isinstance(responses, list):
        raise _RowProblem("responses", f"expected a list of completions, got {_type_name(responses)}")
    if scores is None:
        raise _RowProblem("scores", "missing")
    if not isinstance(scores, list):
        raise _RowProblem("scores", f"expected a list of numbers, got {_type_name(scores)}")
    if len(scores) != len(responses):
        raise _RowProblem("scores", f"{len(scores)} scores for {len(responses)} responses")
    if len(responses) < 2:
        raise _RowProblem("responses", f"need at least 2 completions to form a pair, got {len(responses)}")
    texts = [_scored_text(r, f"responses[{i}]", conversational) for i, r in enumerate(responses)]
    return texts, [_number(v, f"scores[{i}]") for i, v in enumerate(scores)]


def _scored(row: dict, index: int, strategy: str, min_score_gap: float) -> list[PreferenceExample]:
    raw_prompt = row.get("prompt")
    if isinstance(raw_prompt, list):
        prompt = _fold_input(row, _with_system(row, _prompt_messages(_messages(raw_prompt, "prompt"), "prompt")))
        system = None
    else:
        prompt, system = _fold_input(row, _text(row, "prompt")), _optional_text(row, "system")
    conversational = isinstance(prompt, list)
    if "completions" not in row and ("responses" in row or "scores" in row):
        texts, scores = _parallel_scored(row, conversational)
    else:
        items = row.get("completions")
        if items is None:
            raise _RowProblem("completions", "missing")
        if not isinstance(items, list):
            raise _RowProblem("completions", f"expected a list of {{text, score}} objects, got {_type_name(items)}")
        if len(items) < 2:
            raise _RowProblem("completions", f"need at least 2 completions to form a pair, got {len(items)}")
        texts = [_scored_completion(item, f"completions[{i}]", conversational) for i, item in enumerate(items)]
        scores = _scores(items, "completions")
    texts, scores = _merge_repeated_texts(texts, scores)
    return [PreferenceExample(prompt, texts[c], texts[r], index, system)
            for c, r in scored_pairs(scores, strategy, min_score_gap)]


def _merge_repeated_texts(texts: list, scores: list[float]) -> tuple[list, list[float]]:
    """Each distinct text once, at its first place, scored with the mean of its scores. Pairing the listings
    themselves would pair a text with itself, or put it both above and below another text (`same`:1, `same`:5,
    `other`:3 gave other > same AND same > other), contradictory pairs to train on."""
    distinct: list = []
    listed: list[list[float]] = []
    for text, score in zip(texts, scores):
        if text in distinct:  # rows hold a handful of completions: a linear search is fine (texts may be lists)
            listed[distinct.index(text)].append(score)
        else:
            distinct.append(text)
            listed.append([score])
    return distinct, [sum(s) / len(s) for s in listed]


def _sft_prompt_completion(row: dict, index: int) -> SFTExample:
    return SFTExample(_fold_input(row, _text(row, "prompt")), _text(row, "completion"), index, _optional_text(row, "system"))


def _sft_conversational_prompt_completion(row: dict, index: int) -> SFTExample:
    prompt = _fold_input(row, _with_system(row, _prompt_messages(_messages(row.get("prompt"), "prompt"), "prompt")))
    completion = _assistant_messages(_messages(row.get("completion"), "completion"), "completion")
    return SFTExample(prompt, completion, index)


def _sft_messages(row: dict, index: int) -> SFTExample:
    messages = _messages(row.get("messages"), "messages")
    last = len(messages) - 1
    if messages[last]["role"] != "assistant":
        raise _RowProblem(f"messages[{last}].role", f"the last message must be from the assistant, got {messages[last]['role']!r}")
    if last == 0:
        raise _RowProblem("messages", "no user message before the assistant reply")
    prompt = _prompt_messages(messages[:last], "messages")
    completion = _assistant_messages(messages[last:], "messages")
    return SFTExample(_with_system(row, prompt), completion, index)


def _sft_text(row: dict, index: int) -> SFTExample:
    return SFTExample("", _text(row, "text"), index)


_PREFERENCE_PARSERS: dict[str, Callable[[dict, int], PreferenceExample]] = {
    "standard": _standard,
    "conversational": _conversational,
    "implicit_conversational": _implicit_conversational,
    "implicit_hh": _implicit_hh,
}
_SFT_PARSERS: dict[str, Callable[[dict, int], SFTExample]] = {
    "prompt_completion": _sft_prompt_completion,
    "conversational_prompt_completion": _sft_conversational_prompt_completion,
    "messages": _sft_messages,
    "text": _sft_text,
}


# ---------------------------------------------------------------------------------------------------------------
# Format detection and the row loop
# ---------------------------------------------------------------------------------------------------------------


def _columns(rows) -> list[str]:
    """Column names: a Dataset's features, or the keys seen in a list of dicts (in first-seen order)."""
    if hasattr(rows, "column_names"):
        return list(rows.column_names)
    seen: dict[str, None] = {}
    for row in rows:
        if isinstance(row, dict):
            seen.update(dict.fromkeys(row))
    return list(seen)


def _first_value(rows, name: str):
    """The first string or list found in column `name` (decides text vs. conversational)."""
    for row in rows:
        value = row.get(name) if isinstance(row, dict) else None
        if isinstance(value, (str, list)):
            return value
    return None


def _not_empty(rows, source_name: str) -> None:
    if len(rows) == 0:
        raise DataError(f"{source_name}: no rows")


def detect_preference_format(rows, source_name: str) -> str:
    """Name of the preference format of `rows` (already column-mapped), from its columns and first values."""
    _not_empty(rows, source_name)
    cols = set(_columns(rows))
    if {"prompt", "completions"} <= cols or {"prompt", "responses", "scores"} <= cols:
        return "scored"
    if {"images", "image"} & cols:
        raise DataError(f"{source_name}: column '{min({'images', 'image'} & cols)}' holds images, and dpokit trains "
                        "text-only causal LMs; remove the column to train on the text alone")
    if {"prompt", "completion", "label"} <= cols and not {"chosen", "rejected"} & cols:
        raise DataError(f"{source_name}: rows of prompt, completion and label are unpaired feedback (KTO's format); "
                        "DPO needs a chosen and a rejected completion per prompt")
    if {"prompt", "chosen", "rejected"} <= cols:
        if isinstance(_first_value(rows, "prompt"), list):
            return "conversational"
        chosen = _first_value(rows, "chosen")
        if isinstance(chosen, list):
            first = chosen[0] if chosen and isinstance(chosen[0], dict) else {}
            if first.get("role") in ("system", "user"):
                return "implicit_conversational"  # whole conversations beside a redundant text prompt
            raise DataError(f"{source_name}: 'prompt' is text but 'chosen'/'rejected' are message lists; give the "
                            "prompt as messages too ([{role: user, content: ...}]) or the completions as text")
        return "standard"
    if {"chosen", "rejected"} <= cols:
        return "implicit_conversational" if isinstance(_first_value(rows, "chosen"), list) else "implicit_hh"
    raise DataError(f"{source_name}: cannot detect a preference format from columns [{', '.join(sorted(cols))}]; "
                    f"expected prompt+chosen+rejected, chosen+rejected, prompt+completions or prompt+responses+scores (rename columns with column_map)")


def detect_sft_format(rows, source_name: str) -> str:
    """Name of the SFT format of `rows` (already column-mapped), from its columns and first values."""
    _not_empty(rows, source_name)
    cols = set(_columns(rows))
    if "messages" in cols:
        return "messages"
    if {"prompt", "completion"} <= cols:
        return "conversational_prompt_completion" if isinstance(_first_value(rows, "prompt"), list) else "prompt_completion"
    if "text" in cols:
        return "text"
    raise DataError(f"{source_name}: cannot detect an SFT format from columns [{', '.join(sorted(cols))}]; "
                    f"expected messages, prompt+completion or text (rename columns with column_map)")


def _apply_column_map(rows, column_map: dict | None, source_name: str):
    """Rename columns per `column_map` ({source column: canonical name}); returns rows of the same kind."""
    if not column_map:
        return rows
    if not isinstance(column_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in column_map.items()):
        raise ConfigError(f"column_map must map column names to column names, got {column_map!r}")
    cols = _columns(rows)
    for old, new in column_map.items():
        if old not in cols:
            raise DataError(f"{source_name}: column_map names column {old!r}, which is not in the data (columns: {', '.join(cols)})")
        if new in cols and new not in column_map:
            raise DataError(f"{source_name}: column_map renames {old!r} to {new!r}, but the data already has a {new!r} column")
    if hasattr(rows, "rename_columns"):
        return rows.rename_columns(column_map)
    renamed = [{column_map.get(k, k): v for k, v in row.items()} if isinstance(row, dict) else row for row in rows]
    line_numbers = getattr(rows, "line_numbers", None)
    return RowList(renamed, line_numbers) if line_numbers is not None else renamed


def _check_options(dataset_format: str, known: tuple[str, ...], on_bad_rows: str) -> None:
    if dataset_format != "auto" and dataset_format not in known:
        raise ConfigError(f"dataset_format {dataset_format!r} is not one of: auto, {', '.join(known)}")
    if on_bad_rows not in ON_BAD_ROWS:
        raise ConfigError(f"on_bad_rows {on_bad_rows!r} is not one of: {', '.join(ON_BAD_ROWS)}")


def prompt_key(example) -> str:
    """Key equal for examples (pairs, SFT examples, prompts) with the same prompt and system prompt."""
    return json.dumps([example.system, example.prompt], ensure_ascii=False)


def example_key(example) -> str:
    """A text key equal for exactly-equal examples (prompt, completions, system); used for deduplication."""
    values = {f.name: getattr(example, f.name) for f in fields(example) if f.name != "row"}
    return json.dumps(values, sort_keys=True, ensure_ascii=False)


def _example_digest(example) -> bytes:
    """128-bit BLAKE2 digest of `example_key`: deduplicating a million pairs then remembers 16 bytes per pair, not a
    second copy of all their text (a collision, ~2**-64 even at 2**32 pairs, is not a practical concern)."""
    return hashlib.blake2b(example_key(example).encode("utf-8"), digest_size=16).digest()


def _run_parser(rows, source_name: str, fmt: str, parse: Callable, on_bad_rows: str, deduplicate: bool = False):
    """Parse every row; collect problems; raise (on_bad_rows="error") or skip and record them; optionally drop exact
    duplicates of an earlier example (counted in `deduplicated`)."""
    line_numbers = getattr(rows, "line_numbers", None)
    report = DataReport(read=0, kept=0, skipped=0, format=fmt, source=source_name, line_numbers=line_numbers)
    examples, problems, n_problems, seen = [], [], 0, set()
    for index, row in enumerate(rows):
        report.read += 1
        try:
            if not isinstance(row, dict):
                raise _RowProblem(None, f"expected a row object, got {_type_name(row)}")
            example = parse(row, index)
        except _RowProblem as p:
            where = _where(source_name, line_numbers, index)
            message = f"{where}: field '{p.field}': {p.reason}" if p.field else f"{where}: {p.reason}"
            n_problems += 1
            if on_bad_rows == "skip":
                report.skipped_rows.append({"row": index, "reason": message})
            elif len(problems) < MAX_LISTED_PROBLEMS:
                problems.append(message)
            continue
        produced = example if isinstance(example, list) else [example]
        if not produced:
            report.unpaired += 1
        for ex in produced:
            if deduplicate:
                key = _example_digest(ex)
                if key in seen:
                    report.deduplicated += 1
                    continue
                seen.add(key)
            examples.append(ex)
    if problems:
        more = f" (+{n_problems - 1} more)" if n_problems > 1 else ""
        err = DataError(problems[0] + more)
        err.problems = problems
        raise err
    report.skipped = len(report.skipped_rows)
    report.kept = len(examples)
    if report.read == 0:
        raise DataError(f"{source_name}: no rows")
    if not examples and report.skipped_rows:
        raise DataError(f"{source_name}: all {report.read} rows are malformed or unusable; first: {report.skipped_rows[0]['reason']}")
    if not examples:
        raise DataError(f"{source_name}: no usable rows ({report.unpaired} scored rows gave no pair: scores tied or closer "
                        "than min_score_gap, or a single distinct completion)")
    return examples, report


def preference_examples(rows, source_name: str, *, dataset_format: str = "auto", column_map: dict | None = None,
                        on_bad_rows: str = "error", chat_template_available: bool | None = None,
                        pair_strategy: str = "best_vs_worst", min_score_gap: float = 0.0, deduplicate: bool = False
                        ) -> tuple[list[PreferenceExample], DataReport]:
    """Validate `rows` as preference pairs; returns ``(examples, report)``.

    `dataset_format` is ``auto`` or one of `PREFERENCE_FORMATS`; `column_map` renames columns first. With
    ``chat_template_available=False`` conversational data is refused up front (it needs the tokenizer's chat
    template); None skips that check. `pair_strategy` / `min_score_gap` turn ``scored`` rows into pairs (module
    docstring). ``deduplicate=True`` keeps only the first of exactly-equal examples and counts the rest.
    Raises `DataError` for bad rows (``on_bad_rows="error"``) or when no row is left, `ConfigError` for an unknown
    option value.
    """
    _check_options(dataset_format, PREFERENCE_FORMATS, on_bad_rows)
    if pair_strategy not in PAIR_STRATEGIES:
        raise ConfigError(f"pair_strategy {pair_strategy!r} is not one of: {', '.join(PAIR_STRATEGIES)}")
    if isinstance(min_score_gap, bool) or not isinstance(min_score_gap, (int, float)) or not min_score_gap >= 0:
        raise ConfigError(f"min_score_gap must be a number >= 0, got {min_score_gap!r}")
    rows = _apply_column_map(rows, column_map, source_name)
    fmt = detect_preference_format(rows, source_name) if dataset_format == "auto" else dataset_format
    messages = fmt in ("conversational", "implicit_conversational")
    if messages or (fmt == "scored" and isinstance(_first_value(rows, "prompt"), list)):
        _needs_chat_template(chat_template_available, fmt, source_name)
    if fmt == "scored":
        def parse(row, index):
            return _scored(row, index, pair_strategy, float(min_score_gap))
    else:
        parse = _PREFERENCE_PARSERS[fmt]
    return _run_parser(rows, source_name, fmt, parse, on_bad_rows, deduplicate)


def _needs_chat_template(chat_template_available: bool | None, fmt: str, source_name: str) -> None:
    """Refuse message data up front when the tokenizer has no chat template: found while tokenizing, the same fact
    would surface as a row error after part of the work (or of a `data check` report) was done."""
    if chat_template_available is False:
        raise DataError(f"{source_name}: {fmt} data needs a chat template, but the tokenizer has none; "
                        "set chat_template (a Jinja string or file) or use text data")


def _prompt_only(row: dict, index: int) -> PromptExample:
    raw = row.get("prompt")
    if isinstance(raw, list):
        return PromptExample(_fold_input(row, _with_system(row, _prompt_messages(_messages(raw, "prompt"), "prompt"))), index)
    return PromptExample(_fold_input(row, _text(row, "prompt")), index, _optional_text(row, "system"))


_COMPLETION_COLUMNS = {"chosen", "rejected", "completions", "responses", "completion", "messages", "text"}


def prompt_examples(rows, source_name: str, *, column_map: dict | None = None, on_bad_rows: str = "error"
                    ) -> tuple[list[PromptExample], DataReport]:
    """The distinct prompts of `rows`; returns ``(prompts, report)``.

    Rows holding only prompts (a ``prompt`` column: text with optional ``system`` and ``input``, or a message list
    ending with a user turn) give one prompt each. Preference or SFT rows (any format above, e.g. HH transcripts)
    give the prompts of their examples, so a training file can be sampled from as it is. Each distinct prompt is
    kept once, at its first row; the repeats are counted in ``report.deduplicated``. Bad rows are handled as in
    `preference_examples`.
    """
    _check_options("auto", (), on_bad_rows)
    rows = _apply_column_map(rows, column_map, source_name)
    _not_empty(rows, source_name)
    cols = set(_columns(rows))
    if cols & _COMPLETION_COLUMNS:
        preference = bool(cols & {"chosen", "rejected", "completions", "responses"})
        if not preference and detect_sft_format(rows, source_name) == "text":
            raise DataError(f"{source_name}: 'text' rows hold no prompt to sample from; give a 'prompt' column")
        examples, report = (preference_examples if preference else sft_examples)(rows, source_name,
                                                                                on_bad_rows=on_bad_rows)
        prompts = [PromptExample(e.prompt, e.row, e.system) for e in examples]
    elif "prompt" in cols:
        prompts, report = _run_parser(rows, source_name, "prompts", _prompt_only, on_bad_rows)
    else:
        raise DataError(f"{source_name}: no 'prompt' column (columns: {', '.join(sorted(cols))}); rename one with "
                        "column_map, or give preference / SFT rows")
    seen, unique = set(), []
    for p in prompts:
        key = prompt_key(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    report.deduplicated += len(prompts) - len(unique)
    report.kept = len(unique)
    return unique, report


def sft_examples(rows, source_name: str, *, dataset_format: str = "auto", column_map: dict | None = None,
                 on_bad_rows: str = "error", deduplicate: bool = False, chat_template_available: bool | None = None
                 ) -> tuple[list[SFTExample], DataReport]:
    """Validate `rows` as SFT examples; returns ``(examples, report)``. Options as in `preference_examples`."""
    _check_options(dataset_format, SFT_FORMATS, on_bad_rows)
    rows = _apply_column_map(rows, column_map, source_name)
    fmt = detect_sft_format(rows, source_name) if dataset_format == "auto" else dataset_format
    if fmt in ("conversational_prompt_completion", "messages"):
        _needs_chat_template(chat_template_available, fmt, source_name)
    return _run_parser(rows, source_name, fmt, _SFT_PARSERS[fmt], on_bad_rows, deduplicate)
