"""Writing files so that a kill, a full disk or an I/O error never leaves a half-written file where a good one was.

Everything dpokit writes (checkpoints, the final model, data files, reports, logs rewritten on resume) goes to a
temporary name beside its target, is flushed to disk and only then renamed into place: a rename within one directory
is atomic, so a reader sees the old content or the new, never a mix. `fsync_dir` makes the rename itself survive a
power cut, not only a killed process.
"""

from __future__ import annotations

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


def atomic_write_text(path: Path, text: str) -> None:
    """Readers see the old content or the new, never a mix."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


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
