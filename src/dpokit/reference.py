"""The reference policy pi_ref, four ways, behind one method: `logps(batch) -> [2B]` (chosen rows, then rejected).

- `ModelReference`: a frozen model — a copy of the starting policy (default) or a separate `ref_model`.
- `AdapterOffReference`: the policy itself with its LoRA adapters switched off (no second copy in memory).
- `PrecomputedReference`: one pass before training, looked up by dataset row; cached on disk keyed by model and
  data, so the reference model is freed for the whole run (and not run at all on a cache hit).
- no reference (`None`): reference-free losses; the trainer then passes `ref_*_logps=None`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from dpokit.logps import CompletionLogps
from dpokit.packing import batch_logps

# How the reference's CompletionLogps become one score per sequence ([N]): the run's `dpokit.losses.Loss.sequence_logps`
# (the plain sum, or LD-DPO's length-desensitised sum with ld_alpha), the same method the policy's go through.
SequenceLogps = Callable[[CompletionLogps], torch.Tensor]


def frozen(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients: the reference never trains and never keeps activations."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen deep copy of `model` as it is now (call before training starts)."""
    return frozen(copy.deepcopy(model))


class ModelReference:
    """A separate frozen model (a copy of the starting policy or a user-given reference)."""

    def __init__(self, model: nn.Module, sequence_logps: SequenceLogps, chunk_size: int, autocast: Callable):
        self.model = frozen(model)
        self.sequence_logps, self.chunk_size, self.autocast = sequence_logps, chunk_size, autocast

    @torch.no_grad()
    def logps(self, batch: dict) -> torch.Tensor:
        with self.autocast():
            out = batch_logps(self.model, batch, chunk_size=self.chunk_size)
        return self.sequence_logps(out)


class AdapterOffReference:
    """The LoRA policy with its adapters disabled: exactly the frozen base model, without a second copy.

    `call(fn, *args)` runs `fn(policy, *args)`; the trainer points it at the engine-wrapped policy once the engine is
    set up (`dpokit.distributed.PolicyCall`), so that under FSDP the sharded base weights are gathered for the pass."""

    def __init__(self, policy: nn.Module, sequence_logps: SequenceLogps, chunk_size: int, autocast: Callable):
        if not hasattr(policy, "disable_adapter"):
            raise TypeError("adapter-off reference needs a peft model")
        self.policy, self.sequence_logps = policy, sequence_logps
        self.chunk_size, self.autocast = chunk_size, autocast
        self.call: Callable = lambda fn, *args, **kw: fn(policy, *args, **kw)

    @torch.no_grad()
    def logps(self, batch: dict) -> torch.Tensor:
        with self.autocast():
            out = self.call(_adapter_off_logps, batch, chunk_size=self.chunk_size)
        return self.sequence_logps(out)


def _adapter_off_logps(policy: nn.Module, batch: dict, **kwargs) -> CompletionLogps:
    with policy.disable_adapter():
        return batch_logps(policy, batch, **kwargs)


class PrecomputedReference:
    """Reference log-probs computed once per dataset row: `table[row] = (chosen, rejected)`."""

    def __init__(self, table: torch.Tensor):
        self.table = table  # [num_rows, 2] float32, NaN where a row was not computed (dropped rows)

    def logps(self, batch: dict) -> torch.Tensor:
        rows = batch["row"].cpu()
        values = self.table[rows]
        if torch.isnan(values).any():
            raise RuntimeError(f"precomputed reference log-probs missing for rows {rows[torch.isnan(values).any(1)].tolist()}")
        return torch.cat([values[:, 0], values[:, 1]]).to(batch["input_ids"].device)


def model_fingerprint(model: nn.Module, skip: Callable[[str], bool] = lambda name: False) -> str:
    """SHA-256 over the model's parameters and buffers (names, dtypes, bytes): same weights, same key.
    `skip` leaves out tensors by name (the LoRA weights, for an adapter-off reference)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if skip(name):
            continue
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def data_fingerprint(pairs) -> str:
    """SHA-256 over every pair's row id and token ids."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(np.int64(p.row).tobytes())
        for ids in (p.prompt_ids, p.chosen_ids, p.rejected_ids):
            a = np.asarray(ids, dtype=np.int64)
            h.update(np.int64(len(a)).tobytes())
            h.update(a.tobytes())
    return h.hexdigest()


def cache_dir() -> Path:
    """Where precomputed reference log-probs live: $DPOKIT_CACHE_DIR or ~/.cache/dpokit."""
    return Path(os.environ.get("DPOKIT_CACHE_DIR", Path.home() / ".cache" / "dpokit")) / "ref_logps"


def precompute(reference, batches, num_rows: int, cache_key: Optional[str] = None,
               progress: Callable = lambda it: it, accelerator=None) -> PrecomputedReference:
    """Run `reference.logps` over every batch once; load from / store to the cache when `cache_key` is given.

    With an `accelerator` over several processes, `batches` are this rank's share of the rows: each rank fills its
    rows, the tables are gathered (every rank ends with all rows, in dataset order) and each node's first process
    writes the cache. The cache is read only when every rank finds it, so all ranks take the same branch (nodes
    without a shared filesystem may differ)."""
    from safetensors.torch import load_file, save_file

    from dpokit import distributed as dist

    path = cache_dir() / f"{cache_key}.safetensors" if cache_key else None
    hit = path is not None and path.is_file()
    if accelerator is not None and accelerator.num_processes > 1:
        hit = dist.all_reduce_sum(accelerator, [float(hit)])[0] == accelerator.num_processes
    if hit:
        return PrecomputedReference(load_file(str(path))["ref_logps"])
    table = torch.full((num_rows, 2), float("nan"), dtype=torch.float32)
    for batch in progress(batches):
        values = reference.logps(batch).float().cpu()
        b = len(batch["row"])
        table[batch["row"].cpu(), 0] = values[:b]
        table[batch["row"].cpu(), 1] = values[b:]
    if accelerator is not None:
        table = dist.gather_rows(accelerator, table)
    writer = accelerator is None or accelerator.is_local_main_process
    if path is not None and writer:
        from dpokit.fileio import atomic_path

        with atomic_path(path) as tmp:  # a reader never sees half a file
            save_file({"ref_logps": table}, str(tmp))
    return PrecomputedReference(table)


def no_autocast():
    return contextlib.nullcontext()
