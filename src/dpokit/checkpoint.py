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
from typing import Any, Callable, Optional

import numpy as np
import torch

from dpokit.errors import DpokitError
from dpokit.fileio import atomic_write_text, fsync_dir, fsync_tree, replace_dir

LATEST = "latest"
RUN_MARKER = "dpokit_config.yaml"  # the run's resolved config; its presence marks a directory holding a run
STATE_PT = "trainer_state.pt"
STATE_JSON = "trainer_state.json"
FORMAT_VERSION = 2  # 2: optimizer state keyed by parameter name
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
# Test hook: seconds to sleep inside every checkpoint save, after the files are written and before the rename, so a
# test can reliably SIGKILL a run in the middle of a save. Not meant for users.
SLOW_SAVE_ENV = "DPOKIT_TEST_SLOW_SAVE"


class CheckpointError(DpokitError):
    """A checkpoint that cannot be resumed from: missing, incomplete, or from a different run."""


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


def rank_rng(tensors: dict, num_processes: int, process_index: int) -> dict:
    """This rank's saved RNG state. On another number of processes there is no such thing: every rank takes rank 0's
    (only dropout draws from these generators, and its masks then differ from the original run's)."""
    ranks = [tensors["rng"], *tensors["rng"].get("other_ranks", [])]
    return ranks[process_index] if len(ranks) == num_processes else ranks[0]


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


# --------------------------------------------------------------------------------------------------------------------
# Resuming the same run

# Config keys that may differ between a checkpoint and the run resuming from it: they change what is written and where,
# never the numbers. Any other difference is refused (it would silently turn the resume into a different run).
RESUME_MAY_CHANGE = frozenset({
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "logging_steps", "eval_steps", "eval_file",
    "per_device_eval_batch_size", "save_steps", "save_total_limit", "report_to", "disable_tqdm", "on_nonfinite",
    "max_nonfinite_steps", "run_name", "logging_strategy", "logging_first_step", "log_level", "eval_strategy",
    "eval_on_start", "save_strategy", "dataset_test_split", "ddp_timeout", "precompute_ref_batch_size",
})


def check_same_run(saved_config: dict, cfg, what: str, *, global_micro_batch: Optional[int] = None,
                   here: Optional[int] = None, num_processes: int = 1) -> None:
    """Refuse a config that would make another run. With `global_micro_batch` (a checkpoint's; `here` is this run's),
    the per-device batch may differ as long as per-device batch x processes is the same: the data order and every
    step's global batch are then the same, so the run resumes on another number of processes."""
    may_change = set(RESUME_MAY_CHANGE)
    if global_micro_batch is not None:
        if global_micro_batch != here:
            per_device, n = cfg.per_device_train_batch_size, num_processes
            raise CheckpointError(
                f"cannot resume {what}: it was written with {global_micro_batch} examples per data group (a micro-step "
                f"over all processes; with token_budget, an optimizer step), this run has {here} "
                f"(per_device_train_batch_size={per_device} x {n} process(es)); set per_device_train_batch_size to "
                f"{global_micro_batch}/{n} or launch {global_micro_batch}/{per_device} processes")
        may_change.add("per_device_train_batch_size")
    # A key the checkpoint lacks was added to dpokit after it was written: it had that key's default meaning.
    saved_config = {**type(cfg)().to_dict(), **saved_config}
    diffs = config_differences(saved_config, cfg.to_dict(), may_change)
    if diffs:
        raise CheckpointError(f"cannot resume {what}: the config differs in {', '.join(diffs)}; resume with the run's "
                              "settings, or start a new run in another output_dir")


def check_resumable(ckpt: Path, info: dict, cfg, *, global_micro_batch: int, num_processes: int, train_rows: int,
                    train_fingerprint: str, ref_cache_key: Optional[str], total_steps: int) -> None:
    """Refuse to resume from `ckpt` (its trainer_state.json is `info`) anything but the run that wrote it: the same
    config (see `check_same_run`), the same training data, the same precomputed reference, the same length."""
    # Checkpoints from before multi-process support have no size: they were written by one process.
    saved_micro = info.get("global_micro_batch", info["config"].get("per_device_train_batch_size"))
    check_same_run(info["config"], cfg, f"from {ckpt}", global_micro_batch=saved_micro, here=global_micro_batch,
                   num_processes=num_processes)
    if info["data"]["train_fingerprint"] != train_fingerprint:
        raise CheckpointError(f"cannot resume from {ckpt}: the training data differs from the checkpoint's "
                              f"({info['data']['train_rows']} rows then, {train_rows} now, or other token ids)")
    # Only the train split's: eval_file may change on resume.
    if info["ref_cache_keys"].get("train") != ref_cache_key:
        raise CheckpointError(f"cannot resume from {ckpt}: the precomputed reference log-probs differ from the "
                              "checkpoint's (another reference model or precision)")
    if info["total_steps"] != total_steps or info["micro_step"] != 0:
        raise CheckpointError(f"cannot resume from {ckpt}: it was written for {info['total_steps']} steps, "
                              f"this run has {total_steps}")


def named_weights(model: torch.nn.Module, ckpt: Path, peft: bool) -> dict:
    """The checkpoint's weights keyed by `model`'s state-dict names (every trained parameter must be there)."""
    files = read_weights(ckpt, peft=peft)
    # A peft adapter file drops the adapter name ("lora_A.weight" for the module's "lora_A.default.weight").
    names = {}
    for name in model.state_dict():
        names.setdefault(name, name)
        if peft:
            names.setdefault(name.replace(".default", ""), name)
    unknown = [k for k in files if k not in names]
    trained = {names[k] for k in files if k in names}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in trained]
    if unknown or missing:
        raise CheckpointError(f"{ckpt} does not fit this model (unknown {unknown[:3]}, missing {missing[:3]}); "
                              "resume with the run's own model")
    return {names[k]: v for k, v in files.items()}


# --------------------------------------------------------------------------------------------------------------------
# Writing models and checkpoints


def write_model(directory: Path, model: torch.nn.Module, tokenizer, config, state: Optional[dict] = None) -> None:
    """The model (or LoRA adapter) in Hugging Face format, the tokenizer and the run's config. `state`: the full
    weights gathered by an engine that shards them (None: `save_pretrained` reads the model itself)."""
    model.save_pretrained(str(directory), safe_serialization=True, **({"state_dict": state} if state is not None else {}))
    tokenizer.save_pretrained(str(directory))
    config.save(directory / RUN_MARKER)


def save_model(out: Path, write: Callable[[Path], None]) -> None:
    """Write a model with `write(directory)` into `out`, which it shares with checkpoints and metrics, so it cannot
    arrive by one directory rename: it is written to a temporary directory, fsynced, and each file is renamed into
    place (atomic per file), the weights last, so a kill never leaves a half-written file, and a model whose weights
    are there is complete."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".tmp-save-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    write(tmp)
    fsync_tree(tmp)
    written = {item.name for item in tmp.iterdir()}
    for item in sorted(tmp.iterdir(), key=lambda p: is_weights_file(p.name)):
        target = out / item.name
        if item.is_dir() and target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    # Weights of another kind left from an earlier save (an adapter beside a full model, shards beside a single
    # file) would be loaded instead of, or mixed with, these.
    for stale in [p for p in out.iterdir() if p.is_file() and is_model_file(p.name) and p.name not in written]:
        stale.unlink()
    fsync_dir(out)
    tmp.rmdir()


def write_checkpoint(output_dir: Path, step: int, write: Callable[[Path], None], tensors: dict, info: dict) -> Path:
    """checkpoint-N: the model (`write(directory)`) and the trainer state, written to a temporary directory, fsynced
    and renamed into place; then `latest` moves to it."""
    ckpt, tmp = output_dir / f"checkpoint-{step}", output_dir / f".tmp-checkpoint-{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    write(tmp)
    save_state(tmp, tensors, info)
    pause_for_tests()
    fsync_tree(tmp)
    replace_dir(tmp, ckpt)
    write_latest(output_dir, ckpt)
    return ckpt


def rotate(output_dir: Path, step: int, limit: Optional[int]) -> None:
    """Keep the newest `limit` checkpoints (once a new one is complete and `latest` names it). Only this run's past
    counts: a checkpoint-M with M > step is left from a continuation abandoned by resuming an earlier checkpoint, and
    is replaced when this run reaches step M."""
    if not limit:
        return
    done = [path for s, path in list_checkpoints(output_dir) if s <= step]
    for old in done[:-limit]:
        shutil.rmtree(old)
