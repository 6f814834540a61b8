"""The run directory (`output_dir`): who may write into it, what a new run removes from it, and the records written
beside the model (`dpokit_config.yaml`, `data_report.json`, `skipped_rows.jsonl`).

A directory holding `dpokit_config.yaml` holds a run. A new run refuses it unless told to resume it or to overwrite
it; overwriting removes the previous run's checkpoints, model, tokenizer and logs, so that nothing of that run can
later be read as this run's (an old adapter beside a new full model is what `from_pretrained` would load).
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

from dpokit import checkpoint as C
from dpokit import modelcard
from dpokit.errors import ConfigError
from dpokit.fileio import atomic_write_text, read_yaml, writing
from dpokit.metrics import log

RUN_MARKER = C.RUN_MARKER

# Leftovers of saves a kill interrupted; they are ours (dot-names written only by dpokit) and are removed at start.
PARTIAL_PATTERNS = (".tmp-checkpoint-*", ".old-checkpoint-*", ".tmp-save-*", ".*.tmp-*")

# What a run writes at the top of its output_dir besides checkpoints and the model.
RUN_FILES = ("metrics.jsonl", "warnings.jsonl", "skipped_rows.jsonl", "data_report.json", "eval.json", "eval.md",
             "trainer_state.json", "all_results.json", "train_results.json", "eval_results.json", "config.json",
             "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "added_tokens.json", "tokenizer.model", "chat_template.jinja", "chat_template.json", "vocab.json",
             "merges.txt", "README.md")  # README.md: the model card (`claim` refuses a user's first)
RUN_DIRS = ("tensorboard", "runs")  # TensorBoard events: older runs, and transformers' default logging_dir

# The counts of a data report written to data_report.json, per split.
REPORT_FIELDS = ("source", "format", "read", "kept", "skipped", "deduplicated", "truncated_prompt",
                 "truncated_completion", "dropped", "identical_after_truncation", "unpaired")


def check_writable(output_dir: Path) -> None:
    """An output_dir that is a file, or under a directory this process cannot write, is refused by name."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output_dir {str(output_dir)!r} exists and is not a directory")
    parent = output_dir if output_dir.exists() else next((a for a in output_dir.absolute().parents if a.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {str(output_dir)!r} cannot be written: {str(parent)!r} is not a writable "
                          "directory")


def remove_partial_saves(output_dir: Path) -> list[str]:
    removed = []
    for pattern in PARTIAL_PATTERNS:
        for path in output_dir.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(path.name)
    return removed


def remove_run_outputs(output_dir: Path) -> list[str]:
    """Remove the previous run's model, tokenizer and logs from `output_dir` (not its checkpoints); returns names."""
    removed = []
    for path in sorted(output_dir.iterdir()) if output_dir.is_dir() else []:
        if path.is_file() and (path.name in RUN_FILES or C.is_model_file(path.name)):
            path.unlink()
            removed.append(path.name)
        elif path.is_dir() and path.name in RUN_DIRS:
            shutil.rmtree(path)
            removed.append(path.name + "/")
    return removed


LOCK_FILE = ".dpokit.lock"


def _ours(name: str) -> bool:
    """A hidden file dpokit writes itself: the lock, or a killed save's leftovers (never the user's)."""
    return name == LOCK_FILE or any(fnmatch.fnmatch(name, pattern) for pattern in PARTIAL_PATTERNS)


class RunLock:
    """An exclusive lock on a run directory for as long as a run writes into it: `fcntl.flock` on the directory
    itself, which the kernel releases when the process ends however it ends, so a killed run never leaves a stale lock
    (and a refused start leaves no file behind). A second start (a requeued or duplicated cluster job) is refused at
    once, naming the holder from `.dpokit.lock`, which the holder writes once the directory is known to be its run's.
    Re-entrant within one process: `dpokit dpo` holds it across training and the final save."""

    def __init__(self, output_dir: Path):
        self.directory, self.fd, self.depth = output_dir, None, 0

    def acquire(self) -> None:
        import fcntl

        if self.depth:
            self.depth += 1
            return
        make(self.directory)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            self._refuse()
        self.fd, self.depth = fd, 1

    def check_free(self) -> None:
        """Refuse at once, before a second start loads its model and data, when another run holds the directory.
        Only a look: the run takes the lock itself when it starts writing (`acquire`)."""
        import fcntl

        if self.depth or not self.directory.is_dir():
            return
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            self._refuse()
        finally:
            os.close(fd)

    def _refuse(self):
        try:
            holder = json.loads((self.directory / LOCK_FILE).read_text())
        except (OSError, ValueError, RecursionError):  # the holder is still named as unknown
            holder = {}
        holder = holder if isinstance(holder, dict) else {}
        raise ConfigError(f"output_dir {str(self.directory)!r} is in use by another run (pid "
                          f"{holder.get('pid', '?')} on host {holder.get('host', '?')}, since "
                          f"{holder.get('since', '?')}); wait for it to end, or choose another output_dir") from None

    def record_holder(self) -> None:
        """Name this process as the holder, for the message a refused second start prints."""
        import socket

        atomic_write_text(self.directory / LOCK_FILE, json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")

    def release(self) -> None:
        import fcntl

        if self.depth > 1:
            self.depth -= 1
            return
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
        self.fd, self.depth = None, 0

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim(output_dir: Path, *, resume: Optional[str], overwrite: bool, main_process: bool,
          same_run: Callable[[dict, str], None]) -> Optional[Path]:
    """Refuse to write into another run, or into a directory holding anything dpokit did not write (a model, a
    tokenizer, ...) unless `overwrite`; on resume, find the checkpoint (None: there is nothing to resume yet).
    `same_run(saved_config, what)` refuses a config that would make the resumed run another run. The main process
    holds the run's lock (`RunLock`) when it calls this, so nothing is removed under another live run."""
    marker = output_dir / RUN_MARKER
    modelcard.check_replaceable(output_dir)  # the model card the run saves would replace a user's README.md
    if resume is not None:
        if overwrite:
            raise ConfigError("resume_from_checkpoint and overwrite_output_dir are both set; choose one")
        ckpt, note = C.resolve(str(resume), output_dir)
        if note:
            log(note)
        if ckpt is None:
            # A job script that passes --resume on every restart: its first start, or a kill before the first
            # checkpoint, has nothing to resume, and starting over *is* then the exact resume — of the same run.
            if marker.exists():
                same_run(read_yaml(marker), f"the run in {output_dir}")
            else:
                _refuse_foreign(output_dir, "resume_from_checkpoint=latest found no run there")
            log(f"resume_from_checkpoint=latest: no checkpoint in {output_dir} yet; starting at step 0")
        return ckpt
    if marker.exists() and not overwrite:
        raise ConfigError(f"output_dir {str(output_dir)!r} already holds a run; resume it with "
                          "resume_from_checkpoint=latest (--resume), set overwrite_output_dir=true, "
                          "or choose another output_dir")
    if not overwrite:
        _refuse_foreign(output_dir, "it is not empty")
    elif main_process:
        # Left in place, the old run's checkpoints and `latest` would be taken for this run's by a later resume.
        old = C.list_checkpoints(output_dir)
        for _, path in old:
            shutil.rmtree(path)
        (output_dir / C.LATEST).unlink(missing_ok=True)
        files = remove_run_outputs(output_dir)
        if old or files:
            log(f"overwrite_output_dir: removed {len(old)} checkpoint(s) and {len(files)} file(s) of the previous "
                "run (model, tokenizer, logs)")
    return None


def _refuse_foreign(output_dir: Path, why: str) -> None:
    """A directory holding files dpokit did not write for a run (another model, a tokenizer, anything) is not
    trained into: its files would be replaced or mixed with the run's."""
    foreign = sorted(p.name for p in output_dir.iterdir() if not _ours(p.name)) if output_dir.is_dir() else []
    if foreign:
        shown = ", ".join(foreign[:4]) + (", ..." if len(foreign) > 4 else "")
        raise ConfigError(f"output_dir {str(output_dir)!r} holds files no dpokit run wrote ({shown}) and {why}; "
                          "choose an empty or new output_dir, or set overwrite_output_dir=true to write into it")


def make(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create output_dir {str(output_dir)!r}: {exc.strerror}") from None


def start(output_dir: Path, config, reports: dict, sources: dict) -> None:
    """The main process, holding the lock, once the directory is known to be this run's: remove what a killed run's
    saves left half-written, then record the config and the data report."""
    removed = remove_partial_saves(output_dir)
    if removed:
        log(f"removed {len(removed)} partial save(s) of an interrupted run: {', '.join(removed)}")
    with writing(output_dir / RUN_MARKER):
        config.save(output_dir / RUN_MARKER)
    write_data_report(output_dir, reports, sources)


def run_inputs(cfg, model, train_dataset, eval_dataset) -> dict:
    """What a training run reads from disk, by the option that named it (for `fileio.refuse_overlap`)."""
    paths = {"model_name_or_path": model, "tokenizer_name_or_path": cfg.tokenizer_name_or_path,
             "train_file": train_dataset if train_dataset is not None else cfg.train_file,
             "eval_file": eval_dataset if eval_dataset is not None else cfg.eval_file,
             "dataset_name": cfg.dataset_name, "chat_template": cfg.chat_template,
             "ref_model_name_or_path": getattr(cfg, "ref_model_name_or_path", None)}
    def on_disk(value):  # a path, or the paths of a list or mapping of them (several eval files); not a Dataset
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, (list, tuple)):
            return [v for v in value if isinstance(v, (str, os.PathLike))]
        return value if isinstance(value, (str, os.PathLike)) else None

    return {k: found for k, v in paths.items() if (found := on_disk(v))}


def write_data_report(output_dir: Path, reports: dict, sources: dict) -> None:
    """`data_report.json`: per split, the counts printed at load time (rows read, kept, skipped, deduplicated,
    truncated, dropped), so what happened to the data is on record beside the model, not only in a terminal; and
    `skipped_rows.jsonl`, each skipped row with its reason. Written once the output_dir is known to be this run's,
    not at load time: a run refused for writing into another run's directory must not have replaced that run's list."""
    counts = {split: {f: getattr(r, f) for f in REPORT_FIELDS if hasattr(r, f)} for split, r in reports.items()}
    atomic_write_text(output_dir / "data_report.json", json.dumps(counts, indent=2) + "\n")
    skipped = [{"split": split, "source": sources[split], **item}
               for split, r in reports.items() for item in r.skipped_rows]
    if skipped:
        atomic_write_text(output_dir / "skipped_rows.jsonl", "".join(json.dumps(item) + "\n" for item in skipped))
