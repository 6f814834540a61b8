"""Reading data sources into rows: files, ``save_to_disk`` directories, Hub data sets, lists and `datasets` objects.

`load_rows(source)` returns ``(rows, source_name)``: a list of dicts (a `RowList` that remembers line numbers, for
JSON Lines) or a ``datasets.Dataset``, and the name every error message starts with. Turning rows into examples is
`dpokit.data.formats`' job. Every byte read goes through `dpokit.fileio`'s readers, so a file that cannot be read is
a one-line `DataError` naming it (and the line), whatever the reason.
"""

from __future__ import annotations

import csv
import io
import os
from array import array
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from dpokit.errors import DataError
from dpokit.fileio import (
    InvalidJSON,
    JsonLines,
    decode_utf8,
    json_type_name,
    one_line,
    parse_json,
    read_bytes,
    starts_like_gzip,
)

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow")


class RowList(list):
    """A list of row dicts read from a JSON Lines file that remembers each row's 1-based line number."""

    def __init__(self, rows: Iterable[dict], line_numbers: Sequence[int]):
        super().__init__(rows)
        self.line_numbers = line_numbers


def load_rows(source: Any, *, split: str = "train", config_name: Optional[str] = None) -> tuple[list[dict] | Any, str]:
    """Read rows from `source`; returns ``(rows, source_name)``.

    `source` is a path (``.jsonl .json .csv .tsv .parquet .arrow``, each optionally ``.gz``, or a directory written by
    ``datasets.save_to_disk``), a list of dicts, or a ``datasets.Dataset`` / ``DatasetDict`` (`split` picks the split
    of a dict, a ``save_to_disk`` directory or a hub data set; `config_name` is a hub data set's configuration).
    `source_name` is the path as given, ``"<list>"`` or ``"<dataset>"``; it starts every error message.
    JSON Lines are read line by line (rows come back as a `RowList` that remembers line numbers), CSV/TSV with the
    `csv` module (every value a string), Parquet/Arrow/``save_to_disk`` through `datasets`. A file that starts with
    gzip's magic bytes is read as gzip whatever its name (``data.jsonl`` that is really ``data.jsonl.gz``).
    Unreadable input (no such file, invalid JSON or UTF-8, JSON nested too deeply, a broken archive) raises a one-line
    `DataError`.
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
    gz = gz or starts_like_gzip(path)
    if kind == ".jsonl":
        return _jsonl_rows(JsonLines(path, name, gz=gz)), name
    raw = read_bytes(path, name, gz)
    if kind == ".json":
        return _parse_json(raw, path, name, gz), name
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
        reason = one_line(exc)[:200] or type(exc).__name__
        raise DataError(f"{name}: no such file or directory, and loading it as a Hub data set failed ({reason})") from None


def _jsonl_rows(lines: JsonLines) -> RowList:
    """The rows of a JSON Lines file, read one line at a time, so that only the parsed rows are held, never the file's
    bytes too (a million-pair file would otherwise sit in memory as bytes, as a list of lines and as rows at once)."""
    rows, numbers = [], array("q")  # 8 bytes per line number instead of a list entry plus an int object
    keys: dict[str, str] = {}
    for number, obj in lines:
        # json makes fresh key strings for every line; share one per column name (saves ~50 bytes per key per row).
        rows.append({keys.setdefault(k, k): v for k, v in obj.items()})
        numbers.append(number)
    return RowList(rows, numbers)


def _parse_json(raw: bytes, path: Path, name: str, gz: bool) -> list[dict] | RowList:
    """A ``.json`` file holds a JSON array of objects, (as many Hub datasets do) one object per line, or one object
    of columns (`_column_rows`)."""
    _, text = decode_utf8(raw, name)
    try:
        obj = parse_json(text, name)
    except InvalidJSON as exc:
        if exc.reason == "Extra data" and text.lstrip().startswith("{"):
            return _jsonl_rows(JsonLines(path, name, gz=gz))  # JSON Lines under a .json name: a documented form
        raise
    if isinstance(obj, dict):
        columns = _column_rows(obj, name)
        # a single object that is not columns is one row: a one-line JSON Lines file
        return columns if columns is not None else _jsonl_rows(JsonLines(path, name, gz=gz))
    if not isinstance(obj, list):
        raise DataError(f"{name}: expected a JSON array of objects, got {json_type_name(obj)}")
    for i, item in enumerate(obj):
        if not isinstance(item, dict):
            raise DataError(f"{name} row {i + 1}: expected a JSON object, got {json_type_name(item)}")
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
    _, text = decode_utf8(raw, name)
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
        raise DataError(f"{name}:{reader.line_num}: invalid {'TSV' if delimiter == chr(9) else 'CSV'} ({one_line(e)})") from None
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
        raise DataError(f"{name}: not a readable {kind[1:]} file ({one_line(e)})") from None
    return datasets.Dataset(InMemoryTable(table))


def _load_from_disk(path: Path, name: str, split: str):
    import datasets

    if not ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        raise DataError(f"{name}: a directory, but not one written by datasets' save_to_disk (no state.json or dataset_dict.json)")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises a variety of types for a damaged directory
        raise DataError(f"{name}: cannot load the save_to_disk directory ({one_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        return _pick_split(ds, split, name)
    return ds


def _pick_split(dd, split: str, name: str):
    if split not in dd:
        raise DataError(f"{name}: no split {split!r} (splits: {', '.join(dd.keys())})")
    return dd[split]
