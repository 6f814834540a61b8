"""Writing files so that a kill, a full disk or an I/O error never leaves a half-written file where a good one was.

Everything dpokit writes (checkpoints, the final model, data files, reports, logs rewritten on resume) goes to a
temporary name beside its target, is flushed to disk and only then renamed into place: a rename within one directory
is atomic, so a reader sees the old content or the new, never a mix. `fsync_dir` makes the rename itself survive a
power cut, not only a killed process.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


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


def atomic_write_text(path: Path, text: str) -> None:
    """Readers see the old content or the new, never a mix; a failure leaves the old content and no temporary file."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with writing(path):
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


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


def read_text(path, label: str = "") -> str:
    """A UTF-8 text file, or a one-line DpokitError naming it (`label`: the option it came from, e.g.
    `--chat_template`) and the OS's reason."""
    from dpokit.errors import DpokitError

    prefix = f"{label} {path}" if label else str(path)
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DpokitError(f"{prefix}: cannot read (not UTF-8 text: byte {exc.start})") from None
    except OSError as exc:
        raise DpokitError(f"{prefix}: cannot read ({exc.strerror or exc})") from None


def _resolved(path) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def refuse_overlap(outputs: dict, inputs: dict) -> None:
    """The one rule every command that writes follows: no output may be, contain, or lie inside any of its inputs
    (model, reference, adapter, data, run directory), compared after resolving links and `..`, so that writing (or,
    with an overwrite, replacing) an output can never destroy an input. `outputs` and `inputs` map a label (the option
    that named the path, e.g. `output_dir`, `--pairs`) to a path; None values, and inputs that are not on this disk
    (hub ids), are skipped. A command that writes its
    own record into a directory it reads (`dpokit eval`'s eval.json into the evaluated run) lists as inputs the files
    it reads there, not the directory."""
    from dpokit.errors import ConfigError

    given = {label: _resolved(path) for label, path in inputs.items()
             if isinstance(path, (str, os.PathLike)) and Path(path).expanduser().exists()}
    for out_label, out_path in outputs.items():
        if out_path is None:
            continue
        out = _resolved(out_path)
        for in_label, inp in given.items():
            if out == inp:
                how = "is"
            elif inp.is_relative_to(out):
                how = "contains"
            elif out.is_relative_to(inp):
                how = "lies inside"
            else:
                continue
            raise ConfigError(f"{out_label} {str(out_path)!r} {how} {in_label} {str(inputs[in_label])!r}: an output may "
                              f"not be, contain or lie inside an input (writing it could destroy the input); choose "
                              f"another {out_label}")
