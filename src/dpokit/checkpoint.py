"""Checkpoints that a kill cannot corrupt, holding everything an exact resume needs.

A checkpoint `output_dir/checkpoint-N/` holds

- the model (`model.safetensors` + `config.json`) or the LoRA adapter (`adapter_model.safetensors` +
  `adapter_config.json`) and the tokenizer, exactly as `Trainer.save_model` writes them, so every checkpoint is also a
  usable model;
- `trainer_state.pt`: tensors and plain containers only (optimizer, scheduler, gradient scaler, RNG states), read back
  with `torch.load(weights_only=True)`, which cannot run code;
- `trainer_state.json`: everything else, human-readable: the step, the data position, the skipped-step count, the
  running metric means, the metric history, the data fingerprint, the reference cache keys and the config.

Writing: everything goes to `.tmp-checkpoint-N/`, is fsynced and only then renamed to `checkpoint-N` (one atomic
rename), so a directory named `checkpoint-N` is always complete. `output_dir/latest` (a one-line text file) names the
newest complete checkpoint; it is replaced atomically after that rename, so it never names a partial one, and old
checkpoints are deleted only after it has moved on.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from dpokit.errors import DpokitError

LATEST = "latest"
STATE_PT = "trainer_state.pt"
STATE_JSON = "trainer_state.json"
FORMAT_VERSION = 2  # 2: optimizer state keyed by parameter name
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
# Leftovers of saves a kill interrupted; they are ours (dot-names written only by dpokit) and are removed at start.
PARTIAL_PATTERNS = (".tmp-checkpoint-*", ".old-checkpoint-*", ".tmp-save-*", ".*.tmp-*")
# Test hook: seconds to sleep inside every checkpoint save, after the files are written and before the rename, so a
# test can reliably SIGKILL a run in the middle of a save. Not meant for users.
SLOW_SAVE_ENV = "DPOKIT_TEST_SLOW_SAVE"


class CheckpointError(DpokitError):
    """A checkpoint that cannot be resumed from: missing, incomplete, or from a different run."""


# --------------------------------------------------------------------------------------------------------------------
# Durable, atomic file operations


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


def atomic_write_text(path: Path, text: str) -> None:
    """Readers see the old content or the new, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
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


def remove_partial_saves(output_dir: Path) -> list[str]:
    removed = []
    for pattern in PARTIAL_PATTERNS:
        for path in output_dir.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(path.name)
    return removed


def pause_for_tests() -> None:
    seconds = os.environ.get(SLOW_SAVE_ENV)
    if seconds:
        time.sleep(float(seconds))


def is_weights_file(name: str) -> bool:
    return name.endswith(".safetensors") or name in WEIGHT_FILES


def is_model_file(name: str) -> bool:
    """Weights of a full model or of an adapter, in any format transformers or peft loads, and the adapter's
    config (whose presence makes loaders take the directory for an adapter)."""
    return is_weights_file(name) or name.startswith("pytorch_model") or name.startswith("adapter_model") \
        or name == "adapter_config.json"


# What a run writes at the top of its output_dir besides checkpoints and the model: with overwrite_output_dir they
# go, with the model and tokenizer, so that nothing of the previous run is read as this run's (an old adapter
# beside a new full model is what `from_pretrained` and `dpokit eval` would load).
RUN_FILES = ("metrics.jsonl", "warnings.jsonl", "skipped_rows.jsonl", "data_report.json", "eval.json", "eval.md",
             "trainer_state.json", "all_results.json", "train_results.json", "eval_results.json", "config.json",
             "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "added_tokens.json", "tokenizer.model", "chat_template.jinja", "chat_template.json", "vocab.json",
             "merges.txt")
RUN_DIRS = ("tensorboard",)


def remove_run_outputs(output_dir: Path) -> list[str]:
    """Remove the previous run's model, tokenizer and logs from `output_dir` (not its checkpoints); returns names."""
    removed = []
    for path in sorted(output_dir.iterdir()) if output_dir.is_dir() else []:
        if path.is_file() and (path.name in RUN_FILES or is_model_file(path.name)):
            path.unlink()
            removed.append(path.name)
        elif path.is_dir() and path.name in RUN_DIRS:
            shutil.rmtree(path)
            removed.append(path.name + "/")
    return removed


# --------------------------------------------------------------------------------------------------------------------
# Finding checkpoints


def checkpoint_step(path: Path) -> Optional[int]:
    m = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(m.group(1)) if m else None


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    found = [(checkpoint_step(p), p) for p in output_dir.glob("checkpoint-*") if p.is_dir()]
    return sorted((step, p) for step, p in found if step is not None)


def read_latest(output_dir: Path) -> Optional[Path]:
    """The checkpoint `output_dir/latest` names, or None when no checkpoint has been completed yet."""
    pointer = output_dir / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = Path(name) if os.path.isabs(name) else output_dir / name
    if not (path / STATE_JSON).is_file():
        raise CheckpointError(f"{pointer} names {name!r}, which is not a complete checkpoint; "
                              "pass resume_from_checkpoint=PATH to pick one")
    return path


def write_latest(output_dir: Path, checkpoint: Path) -> None:
    """Point `latest` at a complete checkpoint (relative when it lies in output_dir, so the run directory can move)."""
    try:
        name = str(checkpoint.resolve().relative_to(output_dir.resolve()))
    except ValueError:
        name = str(checkpoint.resolve())
    atomic_write_text(output_dir / LATEST, name + "\n")


def resolve(spec: str, output_dir: Path) -> Optional[Path]:
    """`latest` -> the checkpoint `output_dir/latest` names (None if there is none yet); anything else is a path that
    must be a complete checkpoint."""
    if spec == LATEST:
        return read_latest(output_dir)
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"resume_from_checkpoint: no checkpoint directory {spec!r}")
    check_complete(path)
    return path


def check_complete(path: Path) -> None:
    missing = [name for name in (STATE_PT, STATE_JSON) if not (path / name).is_file()]
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        missing.append("model.safetensors or adapter_model.safetensors")
    if missing:
        raise CheckpointError(f"{path} is not a complete dpokit checkpoint (missing {', '.join(missing)})")


# --------------------------------------------------------------------------------------------------------------------
# Trainer state


def capture_rng() -> dict:
    """Every RNG a training step may draw from, as tensors / ints / lists (loadable with weights_only=True)."""
    version, py_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": list(py_state), "gauss": gauss},
        "numpy": {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
    }
    return state


def restore_rng(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        if not torch.cuda.is_available() or torch.cuda.device_count() != len(state["cuda"]):
            raise CheckpointError(f"the checkpoint holds the RNG state of {len(state['cuda'])} CUDA device(s) but "
                                  f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} are visible; "
                                  "resume on the same devices")
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(directory: Path, tensors: dict, info: dict) -> None:
    torch.save(tensors, directory / STATE_PT)
    (directory / STATE_JSON).write_text(json.dumps({"format": FORMAT_VERSION, **info}, indent=1))


def load_state(directory: Path) -> tuple[dict, dict]:
    check_complete(directory)
    try:
        info = json.loads((directory / STATE_JSON).read_text())
        # weights_only: a checkpoint from elsewhere cannot run code when it is read.
        tensors = torch.load(directory / STATE_PT, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as exc:
        first = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"cannot read checkpoint {directory}: {first}") from exc
    if info.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{directory}: checkpoint format {info.get('format')!r}; this dpokit reads "
                              f"format {FORMAT_VERSION}")
    return tensors, info


def read_weights(directory: Path, peft: bool) -> dict:
    """The tensors of a checkpoint's model files: the LoRA adapter, or the (possibly sharded) full model."""
    from safetensors.torch import load_file

    if peft:
        path = directory / "adapter_model.safetensors"
        if not path.is_file():
            raise CheckpointError(f"{directory} holds no LoRA adapter, but this run uses LoRA")
        return load_file(str(path))
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(str(directory / shard)).items()}
    if (directory / "model.safetensors").is_file():
        return load_file(str(directory / "model.safetensors"))
    raise CheckpointError(f"{directory} holds a LoRA adapter, but this run trains the full model")


def load_weights(model: torch.nn.Module, directory: Path, peft: bool) -> None:
    """Copy a checkpoint's weights (or LoRA adapter) into the already-built model, checking that every trained tensor
    is covered: a checkpoint of another architecture is an error, never a partial load."""
    state = read_weights(directory, peft)
    if peft:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state)
        missing = [k for k in result.missing_keys if "lora_" in k]
        unexpected = list(result.unexpected_keys)
    else:
        result = model.load_state_dict(state, strict=False)
        # save_pretrained writes a tied weight (lm_head = embeddings) once; it is loaded through its twin.
        own = model.state_dict()
        loaded_ptrs = {own[k].data_ptr() for k in state if k in own}
        missing = [k for k in result.missing_keys if own[k].data_ptr() not in loaded_ptrs]
        unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        what = (f"missing {missing[:3]}" if missing else "") + (" and " if missing and unexpected else "") + \
               (f"unexpected {unexpected[:3]}" if unexpected else "")
        raise CheckpointError(f"{directory} does not fit this model ({what}); resume with the run's own model")


def examples_fingerprint(examples) -> str:
    """SHA-256 over every example's row id and token ids: resuming on other data would make the saved data position
    meaningless."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(np.int64(ex.row).tobytes())
        for name, value in sorted(vars(ex).items()):
            if isinstance(value, np.ndarray):
                a = np.asarray(value, dtype=np.int64)
                h.update(name.encode() + np.int64(len(a)).tobytes() + a.tobytes())
    return h.hexdigest()


def plain(value: Any) -> Any:
    """A JSON round trip: tuples become lists, so a config read back from JSON or YAML compares equal."""
    return json.loads(json.dumps(value))


def config_differences(saved: dict, current: dict, may_change) -> list[str]:
    """`key (saved -> current)` for every key that differs, other than those in `may_change`."""
    saved, current = plain(saved), plain(current)
    keys = sorted((set(saved) | set(current)) - set(may_change))
    return [f"{k} ({saved.get(k)!r} -> {current.get(k)!r})" for k in keys if saved.get(k) != current.get(k)]
