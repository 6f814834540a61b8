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

from dpokit.errors import DataError, DpokitError
from dpokit.fileio import atomic_write_text, fsync_dir, fsync_tree, read_json, replace_dir, write_error

LATEST = "latest"
RUN_MARKER = "dpokit_config.yaml"  # the run's resolved config; its presence marks a directory holding a run
STATE_PT = "trainer_state.pt"
STATE_JSON = "trainer_state.json"
MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: optimizer state keyed by parameter name
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
# Test hook: seconds to sleep inside every checkpoint save, after the files are written and before the rename, so a
# test can reliably SIGKILL a run in the middle of a save; or the path of a file to wait for (at most 5 minutes), so a
# test can act while a save is under way however slow the machine. Not meant for users.
SLOW_SAVE_ENV = "DPOKIT_TEST_SLOW_SAVE"


class CheckpointError(DpokitError):
    """A checkpoint that cannot be resumed from: missing, incomplete, or from a different run."""


def pause_for_tests() -> None:
    value = os.environ.get(SLOW_SAVE_ENV)
    if not value:
        return
    try:
        time.sleep(float(value))
    except ValueError:
        deadline = time.monotonic() + 300
        while not Path(value).exists() and time.monotonic() < deadline:
            time.sleep(0.05)


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


def _pointer_target(output_dir: Path) -> tuple[Optional[str], Optional[Path]]:
    """(the name `output_dir/latest` holds, the path it means); (None, None) without a readable pointer."""
    pointer = output_dir / LATEST
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None, None
    path = (Path(name) if os.path.isabs(name) else output_dir / name) if name else None
    try:
        path is not None and path.is_dir()
    except (OSError, ValueError):  # not a name a path can have (too long, a NUL byte): a bad pointer
        return name[:80], None
    return name, path


def read_latest(output_dir: Path) -> Optional[Path]:
    """The checkpoint `output_dir/latest` names when it is complete, else None (no checkpoint yet, or a pointer that
    `resolve` will have to see to)."""
    _, path = _pointer_target(output_dir)
    return path if path is not None and path.is_dir() and problem(path) is None else None


def write_latest(output_dir: Path, checkpoint: Path) -> None:
    """Point `latest` at a complete checkpoint (relative when it lies in output_dir, so the run directory can move)."""
    try:
        name = str(checkpoint.resolve().relative_to(output_dir.resolve()))
    except ValueError:
        name = str(checkpoint.resolve())
    atomic_write_text(output_dir / LATEST, name + "\n")


def _damaged(path: Path, what: str, older: list[Path]) -> CheckpointError:
    previous = next((p for p in reversed(older) if problem(p) is None), None)
    offer = (f"; the previous complete checkpoint is {previous}: resume from it with resume_from_checkpoint={previous}"
             if previous is not None else "; no earlier complete checkpoint is left: start the run again")
    return CheckpointError(f"{what} {path} is damaged ({problem(path)}){offer}")


def resolve(spec: str, output_dir: Path) -> tuple[Optional[Path], Optional[str]]:
    """The checkpoint to resume from, and a note to tell the user when it is not the one the pointer names.

    `latest`: the checkpoint `output_dir/latest` names. Checkpoints are found by their own completeness, not only
    through the pointer: with the pointer missing or naming no checkpoint, the newest complete checkpoint is taken
    (and said); with none at all, (None, None): there is nothing to resume yet. A checkpoint whose files do not
    verify is never skipped silently: it is named with what is wrong, and the previous complete one is offered.
    Anything else is the path of a checkpoint, which must verify."""
    found = [path for _, path in list_checkpoints(output_dir)] if output_dir.is_dir() else []
    if spec != LATEST:
        path = Path(spec).expanduser()
        if not path.is_dir():
            raise CheckpointError(f"resume_from_checkpoint: no checkpoint directory {spec!r}")
        if problem(path) is not None:
            siblings = [p for _, p in list_checkpoints(path.parent)]
            raise _damaged(path, "resume_from_checkpoint:", [p for p in siblings if p != path and
                                                             checkpoint_step(p) < (checkpoint_step(path) or 0)])
        return path, None
    name, named = _pointer_target(output_dir)
    if named is not None and named.is_dir():
        if problem(named) is not None:
            raise _damaged(named, "the latest checkpoint", [p for p in found if p != named
                           and (checkpoint_step(p) or 0) < (checkpoint_step(named) or 0)])
        return named, None
    if not found:
        if name is not None:
            raise CheckpointError(f"{output_dir / LATEST} names {name!r}, which is not a checkpoint, and "
                                  f"{output_dir} holds none; start the run again")
        return None, None
    newest = found[-1]
    if problem(newest) is not None:
        raise _damaged(newest, "the newest checkpoint", found[:-1])
    why = "is missing" if name is None else f"names {name!r}, which is not a checkpoint"
    return newest, f"{output_dir / LATEST} {why}; resuming from {newest.name}, the newest complete checkpoint"


REQUIRED_FILES = (STATE_PT, STATE_JSON)
# Files up to this size are hashed into the manifest; larger ones (weights, optimizer state) are checked by size and
# by their own structure (safetensors headers, torch's zip records), so that a save of a large model does not spend
# minutes hashing what a kill or a full disk leaves short, never subtly altered.
HASH_LIMIT = 64 << 20


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    """`manifest.json`, written last into a checkpoint: every file with its size (and, for small files, its hash),
    so that completeness can be checked file by file."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        size = path.stat().st_size
        files[path.relative_to(directory).as_posix()] = {"size": size, **(
            {"sha256": _sha256(path)} if size <= HASH_LIMIT else {})}
    (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def _missing(path: Path) -> Optional[str]:
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        missing.append("model.safetensors or adapter_model.safetensors")
    return f"missing {', '.join(missing)}" if missing else None


def problem(path: Path) -> Optional[str]:
    """What makes `path` an incomplete or damaged checkpoint (one phrase), or None when it verifies."""
    missing = _missing(path)
    if missing:
        return missing
    manifest = path / MANIFEST
    if manifest.is_file():  # checkpoints written before manifests have none: their structure is still checked
        try:
            files = read_json(manifest)["files"]
            entries = [(name, dict(entry)) for name, entry in files.items()]
        except (DataError, KeyError, TypeError, ValueError, AttributeError):
            return f"{MANIFEST} is unreadable"
        for name, entry in entries:
            file = path / name
            if not file.is_file():
                return f"{name} is missing"
            size = file.stat().st_size
            if size != entry.get("size"):
                return f"{name} has {size} bytes, the manifest says {entry.get('size')}"
            if "sha256" in entry and _sha256(file) != entry["sha256"]:
                return f"{name} does not match its checksum"
    from dpokit.models import safetensors_problem

    for file in sorted(path.glob("*.safetensors")):
        wrong = safetensors_problem(file)
        if wrong:
            return f"{file.name}: {wrong}"
    return None


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
    with open(directory / STATE_PT, "wb") as f:  # a Python file: an OS error (a full disk) surfaces as itself
        torch.save(tensors, f)
    (directory / STATE_JSON).write_text(json.dumps({"format": FORMAT_VERSION, **info}, indent=1))


# What every checkpoint's trainer_state.json holds (keys added later, such as global_micro_batch, are optional).
STATE_KEYS = ("global_step", "total_steps", "position", "micro_step", "nonfinite_steps", "meter", "metrics", "data",
              "ref_cache_keys", "config")


def load_state(directory: Path) -> tuple[dict, dict]:
    """A checkpoint's trainer state (`resolve` has verified its files against the manifest)."""
    missing = _missing(directory)
    if missing:
        raise CheckpointError(f"{directory} is not a complete dpokit checkpoint ({missing})")
    try:
        info = read_json(directory / STATE_JSON)
        # weights_only: a checkpoint from elsewhere cannot run code when it is read.
        tensors = torch.load(directory / STATE_PT, map_location="cpu", weights_only=True)
    except (DataError, OSError, ValueError, RuntimeError, pickle.UnpicklingError) as exc:
        first = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"cannot read checkpoint {directory}: {first}") from exc
    if not isinstance(info, dict) or info.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{directory}: checkpoint format {info.get('format') if isinstance(info, dict) else None!r}; "
                              f"this dpokit reads format {FORMAT_VERSION}")
    data = info.get("data") if isinstance(info.get("data"), dict) else {}
    lacking = [k for k in STATE_KEYS if k not in info] + [f"data.{k}" for k in ("train_rows", "train_fingerprint")
                                                          if k not in data]
    lacking += [k for k in ("optimizer", "scheduler", "rng") if not isinstance(tensors, dict) or k not in tensors]
    if lacking:
        raise CheckpointError(f"{directory / STATE_JSON}: lacks {', '.join(lacking)} (a damaged or foreign "
                              "checkpoint); resume from another checkpoint")
    wrong = _state_type_error(info)
    if wrong:
        raise CheckpointError(f"{directory / STATE_JSON}: {wrong} (a damaged or foreign checkpoint); resume from "
                              "another checkpoint")
    return tensors, info


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# The type each trainer_state.json field must have: a hand-edited or foreign file is named, not a TypeError later.
STATE_TYPES = {"global_step": (_count, "a count"), "total_steps": (_count, "a count"),
               "micro_step": (_count, "a count"), "nonfinite_steps": (_count, "a count"),
               "position": (lambda v: isinstance(v, list) and len(v) == 2 and all(map(_count, v)),
                            "[epoch, micro-batch], two counts"),
               "meter": (lambda v: isinstance(v, dict), "an object"), "metrics": (lambda v: isinstance(v, list), "a list"),
               "data": (lambda v: isinstance(v, dict), "an object"),
               "ref_cache_keys": (lambda v: isinstance(v, dict), "an object"),
               "config": (lambda v: isinstance(v, dict), "an object")}


def _state_type_error(info: dict) -> Optional[str]:
    for key, (fits, what) in STATE_TYPES.items():
        if not fits(info[key]):
            return f"{key} must be {what}, got {json.dumps(info[key])[:60]}"
    data = info["data"]
    if not _count(data["train_rows"]) or not isinstance(data["train_fingerprint"], str):
        return "data.train_rows must be a count and data.train_fingerprint a string"
    if not all(isinstance(record, dict) for record in info["metrics"]):
        return "metrics must be a list of objects"
    return None


def read_weights(directory: Path, peft: bool) -> dict:
    """The tensors of a checkpoint's model files: the LoRA adapter, or the (possibly sharded) full model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file as load

    def load_file(path: str) -> dict:
        try:
            return load(path)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path} is damaged ({' '.join(str(exc).split())[:200]}); resume from another "
                                  "checkpoint") from None

    if peft:
        path = directory / "adapter_model.safetensors"
        if not path.is_file():
            raise CheckpointError(f"{directory} holds no LoRA adapter, but this run uses LoRA")
        return load_file(str(path))
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(read_json(index)["weight_map"].values()))
        except (DataError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index} is damaged ({exc if isinstance(exc, DataError) else 'no weight_map'}); "
                                  "resume from another checkpoint") from None
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
    "save_on_sigterm", "logging_dir",
    # The run's length: resuming a finished run with a larger one extends it, as transformers allows. The data order
    # is seeded by (seed, epoch) alone, so the steps added are those an uninterrupted longer run takes; the learning
    # rate schedule is the new length's from the resumed step on (as in transformers), so the extended run equals the
    # longer run exactly when the schedule does not depend on the length (constant, constant_with_warmup).
    "max_steps", "num_train_epochs",
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
    if info["global_step"] > total_steps or info["micro_step"] != 0:
        raise CheckpointError(f"cannot resume from {ckpt}: it is at step {info['global_step']}, beyond this run's "
                              f"{total_steps} steps (max_steps / num_train_epochs); resume with at least as many")


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


def write_model(directory: Path, model: torch.nn.Module, tokenizer, config, state: Optional[dict] = None,
                card: Optional[str] = None) -> None:
    """The model (or LoRA adapter) in Hugging Face format, the tokenizer, the run's config and its model card
    (`card`, README.md; it replaces the template card peft writes for an adapter). `state`: the full weights gathered
    by an engine that shards them (None: `save_pretrained` reads the model itself)."""
    model.save_pretrained(str(directory), safe_serialization=True, **({"state_dict": state} if state is not None else {}))
    tokenizer.save_pretrained(str(directory))
    config.save(directory / RUN_MARKER)
    if card is not None:
        (directory / "README.md").write_text(card, encoding="utf-8")


def save_model(out: Path, write: Callable[[Path], None]) -> None:
    """Write a model with `write(directory)` into `out`, which it shares with checkpoints and metrics, so it cannot
    arrive by one directory rename: it is written to a temporary directory, fsynced, and each file is renamed into
    place (atomic per file), the weights last, so a kill never leaves a half-written file, and a model whose weights
    are there is complete."""
    tmp = out / f".tmp-save-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        write(tmp)
        fsync_tree(tmp)
    except Exception as exc:  # a full disk, an I/O error: nothing of the new model replaced anything yet
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(f"the model in {out}", exc) from exc
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
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        write(tmp)
        save_state(tmp, tensors, info)
        write_manifest(tmp)  # last: a checkpoint whose manifest is there was written whole
        pause_for_tests()
        fsync_tree(tmp)
    except Exception as exc:  # a full disk, an I/O error: the temporary directory goes, the older checkpoints stay
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(ckpt, exc) from exc
    replace_dir(tmp, ckpt)
    write_latest(output_dir, ckpt)
    return ckpt


def last_checkpoint_note(output_dir: Path) -> str:
    """Which checkpoint a stopped run can be resumed from, for the line that says why it stopped."""
    latest = read_latest(output_dir)
    return f"the last complete checkpoint, {latest}, is intact" if latest else "no checkpoint had been written"


def rotate(output_dir: Path, step: int, limit: Optional[int], keep: Optional[str] = None) -> None:
    """Keep the newest `limit` checkpoints (once a new one is complete and `latest` names it). Only this run's past
    counts: a checkpoint-M with M > step is left from a continuation abandoned by resuming an earlier checkpoint, and
    is replaced when this run reaches step M. `keep` (the best checkpoint) is never deleted and counts among the
    `limit`, as transformers keeps it; with limit 1 the newest is kept beside it."""
    if not limit:
        return
    done = [path for s, path in list_checkpoints(output_dir) if s <= step]
    if keep is not None and Path(keep) in done and done[-1] != Path(keep):
        done.remove(Path(keep))
        limit = max(limit - 1, 1)
    for old in done[:-limit]:
        shutil.rmtree(old)


# --------------------------------------------------------------------------------------------------------------------
# A trainer's checkpoint: what the loop needs to go on exactly where it stopped


def save_checkpoint(trainer) -> Path:
    """`trainer`'s checkpoint-N: model, tokenizer and trainer state; then `latest` moves to it; only then are checkpoints
    beyond save_total_limit deleted."""
    from dpokit import distributed as dist
    from dpokit.optim import group_names

    acc, groups = trainer.accelerator, group_names(trainer.model)
    # Each rank's RNG state, the full weights and the full optimizer state: collectives, every rank calls them.
    rng_ranks = dist.gather_objects(acc, capture_rng())
    state = trainer.engine.full_weights(trainer.policy, trainer.args.bf16)
    optimizer = trainer.engine.optimizer_state(trainer.policy, trainer.optimizer, groups)
    ckpt = trainer.output_dir / f"checkpoint-{trainer.global_step}"
    if acc.is_main_process:
        tensors = {"optimizer": optimizer, "scheduler": trainer.engine.scheduler_state(trainer.scheduler.state_dict(),
                                                                                     groups),
                   "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                   "rng": {**rng_ranks[0], **({"other_ranks": rng_ranks[1:]} if len(rng_ranks) > 1 else {})}}
        info = {
            "global_step": trainer.global_step, "total_steps": trainer.schedule.total_steps(),
            # Checkpoints fall between optimizer steps, so no micro-batch of the next step has been consumed: the
            # micro-step within accumulation is always 0 and (epoch, next data group) is the whole data position.
            "position": list(trainer._position), "micro_step": 0, "nonfinite_steps": trainer.guard.skipped,
            "meter": trainer._meter.state(), "metrics": trainer._sink.history,
            "data": {"train_rows": len(trainer.train_examples), "train_fingerprint": _train_fingerprint(trainer)},
            "ref_cache_keys": trainer.ref_cache_keys, "config": plain(trainer.args.to_dict()),
            # The data position counts global data groups of this size; a resume needs the same size.
            "num_processes": acc.num_processes, "global_micro_batch": trainer.schedule.global_micro_batch_size(),
            # transformers' TrainerState fields too (epoch as epochs completed, num_train_epochs, the best metric).
            **trainer.events.checkpoint_info(),
        }
        write_checkpoint(trainer.output_dir, trainer.global_step, trainer._writer(state), tensors, info)
        best = trainer.events.state.best_model_checkpoint if trainer.args.load_best_model_at_end else None
        rotate(trainer.output_dir, trainer.global_step, trainer.args.save_total_limit, keep=best)
    acc.wait_for_everyone()
    return ckpt

def _train_fingerprint(trainer) -> str:
    if trainer._train_fp is None:
        trainer._train_fp = examples_fingerprint(trainer.train_examples)
    return trainer._train_fp

def check_trainer_can_resume(trainer, ckpt: Path, info: dict, total_steps: int) -> None:
    """`check_resumable` for this trainer: called before the run writes anything into its directory, so a refused
    resume leaves the run's record (dpokit_config.yaml, data_report.json) as it was."""
    check_resumable(ckpt, info, trainer.args, global_micro_batch=trainer.schedule.global_micro_batch_size(),
                    num_processes=trainer.accelerator.num_processes, train_rows=len(trainer.train_examples),
                    train_fingerprint=_train_fingerprint(trainer),
                    ref_cache_key=trainer.ref_cache_keys.get("train"), total_steps=total_steps)


def restore(trainer, ckpt: Path, tensors: dict, info: dict, total_steps: int) -> None:
    """Put weights, optimizer, scheduler, scaler, data position and counters back where `ckpt` left them, once
    `check_trainer_can_resume` has found it this run's (the RNG states are restored by `train`, right before the
    first step)."""
    from dpokit.metrics import MeanMeter, log
    from dpokit.optim import group_names

    acc, groups = trainer.accelerator, group_names(trainer.model)
    trainer.engine.load_state(trainer.model, trainer.policy, trainer.optimizer, ckpt, tensors["optimizer"], groups,
                           trainer.use_peft)
    trainer.scheduler.load_state_dict(trainer.engine.load_scheduler_state(tensors["scheduler"], groups))
    if acc.scaler is not None and tensors["scaler"] is not None:
        acc.scaler.load_state_dict(tensors["scaler"])
    trainer.global_step, trainer._position = info["global_step"], tuple(info["position"])
    trainer.guard.skipped = info["nonfinite_steps"]
    trainer._meter = MeanMeter.from_state(info["meter"])
    log(f"resumed from {ckpt} at step {trainer.global_step} "
        f"(epoch {trainer._position[0]}, micro-batch {trainer._position[1]})")
