"""The run directory (`output_dir`): who may write into it, what a new run removes from it, and the records written
beside the model (`dpokit_config.yaml`, `data_report.json`, `skipped_rows.jsonl`).

A directory holding `dpokit_config.yaml` holds a run. A new run refuses it unless told to resume it or to overwrite
it; overwriting removes the previous run's checkpoints, model, tokenizer and logs, so that nothing of that run can
later be read as this run's (an old adapter beside a new full model is what `from_pretrained` would load).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

from dpokit import checkpoint as C
from dpokit.errors import ConfigError
from dpokit.metrics import log

RUN_MARKER = C.RUN_MARKER

# Leftovers of saves a kill interrupted; they are ours (dot-names written only by dpokit) and are removed at start.
PARTIAL_PATTERNS = (".tmp-checkpoint-*", ".old-checkpoint-*", ".tmp-save-*", ".*.tmp-*")

# What a run writes at the top of its output_dir besides checkpoints and the model.
RUN_FILES = ("metrics.jsonl", "warnings.jsonl", "skipped_rows.jsonl", "data_report.json", "eval.json", "eval.md",
             "trainer_state.json", "all_results.json", "train_results.json", "eval_results.json", "config.json",
             "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "added_tokens.json", "tokenizer.model", "chat_template.jinja", "chat_template.json", "vocab.json",
             "merges.txt")
RUN_DIRS = ("tensorboard",)

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


def claim(output_dir: Path, *, resume: Optional[str], overwrite: bool, main_process: bool,
          same_run: Callable[[dict, str], None]) -> Optional[Path]:
    """Refuse to write into another run; on resume, find the checkpoint (None: there is nothing to resume yet).
    `same_run(saved_config, what)` refuses a config that would make the resumed run another run."""
    import yaml

    marker = output_dir / RUN_MARKER
    if resume is not None:
        if overwrite:
            raise ConfigError("resume_from_checkpoint and overwrite_output_dir are both set; choose one")
        ckpt = C.resolve(str(resume), output_dir)
        if ckpt is None:
            # A job script that passes --resume on every restart: its first start, or a kill before the first
            # checkpoint, has nothing to resume, and starting over *is* then the exact resume — of the same run.
            if marker.exists():
                same_run(yaml.safe_load(marker.read_text()) or {}, f"the run in {output_dir}")
            log(f"resume_from_checkpoint=latest: no checkpoint in {output_dir} yet; starting at step 0")
        return ckpt
    if marker.exists() and not overwrite:
        raise ConfigError(f"output_dir {str(output_dir)!r} already holds a run; resume it with "
                          "resume_from_checkpoint=latest (--resume), set overwrite_output_dir=true, "
                          "or choose another output_dir")
    if overwrite and main_process:
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


def create(output_dir: Path) -> None:
    """Make the directory and remove what a killed run's saves left half-written."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create output_dir {str(output_dir)!r}: {exc.strerror}") from None
    removed = remove_partial_saves(output_dir)
    if removed:
        log(f"removed {len(removed)} partial save(s) of an interrupted run: {', '.join(removed)}")


def write_data_report(output_dir: Path, reports: dict, sources: dict) -> None:
    """`data_report.json`: per split, the counts printed at load time (rows read, kept, skipped, deduplicated,
    truncated, dropped), so what happened to the data is on record beside the model, not only in a terminal; and
    `skipped_rows.jsonl`, each skipped row with its reason. Written once the output_dir is known to be this run's,
    not at load time: a run refused for writing into another run's directory must not have replaced that run's list."""
    counts = {split: {f: getattr(r, f) for f in REPORT_FIELDS if hasattr(r, f)} for split, r in reports.items()}
    (output_dir / "data_report.json").write_text(json.dumps(counts, indent=2) + "\n")
    skipped = [{"split": split, "source": sources[split], **item}
               for split, r in reports.items() for item in r.skipped_rows]
    if skipped:
        with (output_dir / "skipped_rows.jsonl").open("w") as f:
            f.writelines(json.dumps(item) + "\n" for item in skipped)
