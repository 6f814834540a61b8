"""Writing files so that a kill, a full disk or an I/O error never leaves a half-written file where a good one was, and
reading them so that whatever is wrong with a file is one line naming it (and the line).

Everything dpokit writes (checkpoints, the final model, data files, reports, logs rewritten on resume) goes to a
temporary name beside its target, is flushed to disk and only then renamed into place: a rename within one directory
is atomic, so a reader sees the old content or the new, never a mix. `fsync_dir` makes the rename itself survive a
power cut, not only a killed process.

Everything dpokit reads (data files, run logs, configs, eval results, adapter configs) goes through the readers at the
end: `read_bytes`, `read_text`, `read_json`, `JsonLines` and `read_yaml`. A missing or unreadable file, a broken gzip
stream, invalid UTF-8 or JSON, and JSON or YAML nested deeper than Python's parsers can follow become one-line
`DataError`s (`ConfigError`s for YAML, which dpokit reads as configs) naming ``file:LINE`` where a line is known, never
a traceback. A file that starts with gzip's magic bytes is read as gzip whatever its name.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional

from dpokit.errors import ConfigError, DataError


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` survive a power cut, not only a killed process."""
    if os.name == "nt":  # Windows cannot open a directory; its renames are journaled by NTFS
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


def temporary_name(path: Path) -> Path:
    """The hidden name beside `path` that a write goes to before the rename (removed at start if a kill left it)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_error(path, exc: BaseException):
    """A failure while writing `path` as one line naming it and the OS's reason (a full disk, an I/O error, a lost
    permission). torch and safetensors report OS failures in their own words; their first line is kept."""
    from dpokit.errors import DpokitError, WriteError

    if isinstance(exc, DpokitError):
        return exc
    cause = _os_error(exc)
    if cause is not None:
        reason = f"[Errno {cause.errno}] {cause.strerror or os.strerror(cause.errno)}"
    else:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
    return WriteError(f"cannot write {path}: {reason}")


def _os_error(exc: BaseException):
    """The OS error behind a write failure: the exception itself, one it was raised from or during (torch wraps a
    file object's OSError in its own RuntimeError), or the `os error N` that safetensors writes into its message."""
    import re

    seen, current = set(), exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno:
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    found = re.search(r"os error (\d+)", str(exc))
    return OSError(int(found.group(1)), os.strerror(int(found.group(1)))) if found else None


@contextlib.contextmanager
def writing(path):
    """Turn a failure while writing `path` into `write_error`'s one line (KeyboardInterrupt and the like pass)."""
    try:
        yield
    except Exception as exc:
        raise write_error(path, exc) from exc


def discard(path: Path) -> None:
    """Remove a temporary file or directory after a failed write. Its own failure (a read-only or vanished
    filesystem, where even removing a file that was never made fails) is ignored: it must never replace the error
    that says why the write failed."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


@contextlib.contextmanager
def atomic_path(path, what: Optional[str] = None) -> Iterator[Path]:
    """The one way dpokit writes a file or a directory: ``with atomic_path(target) as tmp: write(tmp)``. `tmp` is a
    hidden name beside `path` (its parent directories are made); once the block ends, `tmp` is flushed to disk and
    renamed onto `path`, so readers see the old content or the new, never a mix. A directory that `path` held is
    moved aside and deleted only once the new one is in place. Any failure (a full disk, a read-only filesystem, an
    I/O error, in whatever words torch or safetensors report it) removes `tmp` and becomes `write_error`'s one line
    naming `what` (default `path`); the old content stays."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with writing(what or path):
            path.parent.mkdir(parents=True, exist_ok=True)
            discard(tmp)  # left by a killed writer of the same pid (a container's pid 1)
            yield tmp
            if tmp.is_dir():
                fsync_tree(tmp)
                replace_dir(tmp, path)
            else:
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, path)
                fsync_dir(path.parent)
    except BaseException:
        discard(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Readers see the old content or the new, never a mix; a failure leaves the old content and no temporary file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def append_text(path: Path, text: str) -> None:
    """Append to a log (metrics.jsonl, warnings.jsonl); a failure is `write_error`'s one line."""
    with writing(path):
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)


def replace_dir(src: Path, dst: Path) -> None:
    """Rename the complete directory `src` to `dst`. A `dst` that exists (a checkpoint of an abandoned continuation
    after resuming from an earlier one) is moved aside first and deleted only once `src` is in place."""
    old = None
    if dst.exists():
        old = dst.with_name(f".old-{dst.name}-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old)


# --------------------------------------------------------------------------------------------------------------------
# Reading

_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark: not part of the text


def one_line(text: Any) -> str:
    """An exception's text (pyarrow's and datasets' are multi-line) as one line."""
    return " ".join(str(text).split())


def json_type_name(value: Any) -> str:
    """What a parsed JSON value is, in the words error messages use."""
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "integer", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _why(exc: BaseException) -> str:
    """The OS's reason ("No such file or directory") without errno and path, else the exception's text."""
    return getattr(exc, "strerror", None) or one_line(exc) or type(exc).__name__


def _prefix(path, label: str) -> str:
    return f"{label} {path}" if label else str(path)


def starts_like_gzip(path) -> bool:
    """True when the file begins with gzip's magic bytes 1f 8b: a compressed file that lost its .gz suffix would
    otherwise fail as "invalid UTF-8 (byte 0x8b ...)". No UTF-8 text, Parquet or Arrow file starts so. An unreadable
    file gives False; reading it then says why."""
    try:
        with open(path, "rb") as f:
            return f.read(2) == b"\x1f\x8b"
    except OSError:
        return False


def read_bytes(path, label: str = "", gz: Optional[bool] = None) -> bytes:
    """The bytes of a file, decompressed when it is gzip (`gz`: None detects it from the content), or a one-line
    DataError naming it (`label`: the option it came from, e.g. `--chat_template`)."""
    gz = starts_like_gzip(path) if gz is None else gz
    try:
        if gz:
            with gzip.open(path, "rb") as f:
                return f.read()
        return Path(path).read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # a gzip stream can turn out broken half-way through
        raise DataError(f"{_prefix(path, label)}: cannot read{' gzip file' if gz else ''} ({_why(exc)})") from None


def decode_utf8(raw: bytes, name: str) -> tuple[bytes, str]:
    """(`raw` without a leading byte order mark, its text); undecodable bytes are an error naming `name:LINE`."""
    if raw.startswith(_BOM):
        raw = raw[len(_BOM):]
    try:
        return raw, raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{name}:{line}: invalid UTF-8 (byte 0x{raw[exc.start]:02x})") from None


def read_text(path, label: str = "") -> str:
    """A UTF-8 text file (gzip read as such), or a one-line DataError naming it (`label`: the option it came from,
    e.g. `--chat_template`) and the reason."""
    return decode_utf8(read_bytes(path, label), _prefix(path, label))[1]


class InvalidJSON(DataError):
    """Text that is not JSON; `reason` is the parser's ("Expecting value", "Extra data", ...)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def parse_json(text: str, name: str, line: Optional[int] = None) -> Any:
    """`json.loads`, its failures one-line errors naming `name:LINE`: `line` is where `text` starts in the file (a
    JSON Lines line), else the line comes from the parser. JSON nested too deeply for Python's parser (it recurses,
    and "[" * 100000 is a valid start) is refused as such; the recursion limit is not raised to read it."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        at = line if line is not None else exc.lineno
        raise InvalidJSON(f"{name}:{at}: invalid JSON ({exc.msg} at column {exc.colno})", exc.msg) from None
    except RecursionError:
        where = f"{name}:{line}" if line is not None else name
        raise DataError(f"{where}: JSON nested too deeply to read (deeper than Python's parser can follow)") from None


def read_json(path, label: str = "") -> Any:
    """The JSON value of a file, or a one-line DataError naming it (and the line)."""
    name = _prefix(path, label)
    return parse_json(decode_utf8(read_bytes(path, label), name)[1], name)


class JsonLines:
    """The objects of a JSON Lines file (gzip read as such; `gz` forces it) as ``(line number, object)``, 1-based, read one line at a
    time so that only the parsed objects are ever held. Blank lines are skipped (but counted); every other line must
    be a JSON object, else a one-line DataError names ``file:LINE``.

    ``appended=True`` is for logs that a run appends to (metrics.jsonl, warnings.jsonl): a run killed while writing
    leaves its last line without its newline, and that line, when it does not parse, is skipped and its number kept
    in `cut_short` for the reader to report. A bad line that ends with a newline, anywhere, is still an error: it
    was written whole, so it is not a kill's doing.
    """

    def __init__(self, path, name: Optional[str] = None, *, appended: bool = False, gz: Optional[bool] = None):
        self.path = Path(path)
        self.name = str(path) if name is None else name
        self.appended = appended
        self.gz = gz  # None: detected from the content
        self.cut_short: Optional[int] = None

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        gz = starts_like_gzip(self.path) if self.gz is None else self.gz
        try:
            with (gzip.open(self.path, "rb") if gz else open(self.path, "rb")) as f:
                yield from self._objects(f)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{self.name}: cannot read{' gzip file' if gz else ''} ({_why(exc)})") from None

    def _objects(self, lines: BinaryIO) -> Iterator[tuple[int, dict]]:
        for number, line in enumerate(lines, start=1):  # a binary file splits on b"\n" only, as JSON Lines does
            if number == 1 and line.startswith(_BOM):
                line = line[len(_BOM):]
            whole = line.endswith(b"\n")
            try:
                text = self._decode(line[:-1] if whole else line, number)
                if not text.strip():
                    continue
                value = parse_json(text, self.name, number)
            except DataError:
                if self.appended and not whole:  # only the last line can lack its newline
                    self.cut_short = number
                    return
                raise
            if not isinstance(value, dict):
                raise DataError(f"{self.name}:{number}: expected a JSON object, got {json_type_name(value)}")
            yield number, value

    def _decode(self, raw: bytes, number: int) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{self.name}:{number}: invalid UTF-8 (byte 0x{raw[exc.start]:02x} at column "
                            f"{exc.start + 1})") from None


def read_yaml(path, loader: Any = None) -> dict:
    """The mapping a YAML file holds (every YAML file dpokit reads is a config; an empty file is an empty mapping),
    `loader` a yaml Loader class (default SafeLoader). Invalid YAML, YAML nested too deeply for PyYAML (which
    recurses), or a value that is not a mapping is a one-line ConfigError naming ``file:LINE``."""
    import yaml

    text = read_text(path)
    try:
        value = yaml.load(text, Loader=loader or yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(exc, 'problem', None) or one_line(exc)})") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply to read (deeper than Python's parser can follow)") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(value).__name__}")
    return value


def _resolved(path) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def _paths(entries: dict) -> list[tuple[str, Path, Any]]:
    """(label, resolved path, path as given) of each entry; a list value (an option given several times, nargs)
    gives one row per path; None and empty values are left out."""
    rows = []
    for label, value in entries.items():
        for path in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(path, (str, os.PathLike)) and str(path) != "":
                rows.append((label, _resolved(path), path))
    return rows


def _relation(a: Path, b: Path) -> Optional[str]:
    if a == b:
        return "is"
    if b.is_relative_to(a):
        return "contains"
    if a.is_relative_to(b):
        return "lies inside"
    return None


def refuse_overlap(outputs: dict, inputs: dict, *, hosts: Optional[dict] = None, own: Any = ()) -> None:
    """The one rule every command that writes follows: no output may be, contain, or lie inside any of its inputs
    (model, reference, adapter, data, run directory), compared after resolving links and `..`, so that writing (or,
    with an overwrite, replacing) an output can never destroy an input; and no two outputs may be one path (the
    second would replace the first). `outputs` and `inputs` map a label (the option that named the path, e.g.
    `output_dir`, `--pairs`) to a path or a list of paths; None values, and inputs that are not on this disk (hub ids),
    are skipped. Command-line options declare their role once (`dpokit.options.Parser`, ``reads=``/``writes=``),
    and the parser applies this rule to every command.

    `hosts` are input directories a command writes its own records into (`dpokit eval`'s eval.json into the
    evaluated run, `dpokit report`'s report.html into the first run): an output inside one is allowed when it is a
    new file or one of the command's own records (`own`: file names, or a test of a path), never when it would
    replace a file of the run (its weights, its logs)."""
    from dpokit.errors import ConfigError

    given = [(label, resolved, path, is_host) for entries, is_host in ((inputs, False), (hosts or {}, True))
             for label, resolved, path in _paths(entries) if Path(path).expanduser().exists()]
    written = _paths(outputs)
    for i, (out_label, out, out_path) in enumerate(written):
        for in_label, inp, in_path, is_host in given:
            how = _relation(out, inp)
            if how == "lies inside" and is_host:  # beside the run's files: new, or the command's own record
                if not out.exists() or (own(out) if callable(own) else out.name in own):
                    continue
                records = " or this command's own records" + (
                    f" ({', '.join(own)})" if own and not callable(own) else "")
                raise ConfigError(f"{out_label} {out_path} would replace a file of {in_label} {in_path}: "
                                  f"only new files{records} may be written there; choose another {out_label}")
            if how:
                raise ConfigError(f"{out_label} {out_path} {how} {in_label} {in_path}: an output may not be, "
                                  f"contain or lie inside an input (writing it could destroy the input); choose "
                                  f"another {out_label}")
        for other_label, other, other_path in written[i + 1:]:
            how = _relation(out, other)
            if how:
                raise ConfigError(f"{out_label} {out_path} {how} {other_label} {other_path}: two outputs may not "
                                  f"share a path (the second would replace the first); choose another {other_label}")
