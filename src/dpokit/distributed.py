"""One training run over several processes (accelerate's DDP or FSDP) with the numbers of a single process.

The rules that make N processes equal one process whose per-device batch is N times larger:

- the data order is global: each micro-step takes the next `per_device_train_batch_size x num_processes` examples of
  the epoch's permutation (exactly the micro-batch a single process with that batch size would take), and each rank
  takes its own disjoint part of it (`rank_part`);
- the loss of an optimizer step is the sum over the *global* batch divided by the *global* weight (pairs or tokens,
  all-reduced once per step); DDP and FSDP average gradients over ranks, so each rank backpropagates
  `local_sum * num_processes / global_weight`;
- every rank runs the same number of forward/backward passes per step (a rank whose part is empty runs a zero-weight
  pass), because the engines' collectives must pair up;
- metrics are summed with their weights across ranks before they are logged.

The policy is called through `PolicyCall` so that the engine's forward hooks run (DDP's gradient all-reduce, FSDP's
parameter all-gather) even though `dpokit.logps` calls the decoder and the LM head directly.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
from torch import nn

from dpokit.errors import ConfigError


class PolicyCall(nn.Module):
    """`PolicyCall(model)(fn, *args, **kw) == fn(model, *args, **kw)`, as a module forward.

    accelerate wraps *this* module (DDP, FSDP); calling it runs the wrapper's forward, hence its hooks, and then any
    log-prob function on the inner Hugging Face / peft model (`completion_logps`, the packed path, an adapter-off
    reference pass). `model` stays the plain model for saving and for peft's `disable_adapter`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        # accelerate's FSDP transformer auto-wrap reads the root module's block classes (e.g. LlamaDecoderLayer).
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._no_split_modules = getattr(base, "_no_split_modules", None)

    def forward(self, fn: Callable, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


def make_accelerator(mixed_precision: str):
    """An `Accelerator` for this launch. Under `torchrun` or `accelerate launch --cpu` on a machine without an
    accelerator, accelerate needs `cpu=True` to set up gloo (without it every process silently runs alone)."""
    from accelerate import Accelerator

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = distributed and not _has_accelerator_device()
    plugin = None
    if cpu and _asked("ACCELERATE_USE_FSDP"):
        plugin = _cpu_fsdp_plugin()
    acc = Accelerator(mixed_precision=mixed_precision, cpu=cpu, **({"fsdp_plugin": plugin} if plugin else {}))
    if plugin is not None:
        _enable_fsdp_on_cpu(acc, plugin)
    check_engine(acc)
    return acc


def _asked(variable: str) -> bool:
    return os.environ.get(variable, "false").lower() == "true"


def _cpu_fsdp_plugin():
    """The FSDP plugin `accelerate launch` describes in FSDP_* variables, checked for what runs on CPU."""
    from accelerate import FullyShardedDataParallelPlugin

    version = int(os.environ.get("FSDP_VERSION", "1"))
    if version != 2:
        raise ConfigError(f"FSDP version {version} needs an accelerator device (torch's FSDP1 refuses CPU "
                          "parameters); set fsdp_version: 2 in the accelerate config (examples/accelerate/fsdp.yaml)")
    return FullyShardedDataParallelPlugin()


def _enable_fsdp_on_cpu(acc, plugin) -> None:
    """Turn accelerate's CPU multi-process state (gloo, DDP) into FSDP2.

    Why: torch's FSDP2 (`fully_shard`) runs on CPU tensors over gloo, but accelerate (1.x) switches to FSDP only
    for GPU-type devices and otherwise drops the plugin and silently sets up DDP (accelerate/state.py, the
    `distributed_type in [MULTI_GPU, ...]` branch). This does for CPU what that branch does for GPUs: set the
    distributed type and keep the plugin. Everything after (prepare, no_sync, clip_grad_norm_, get_state_dict) is
    accelerate's own FSDP2 code; tests/test_distributed.py checks the result equals one process."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if acc.distributed_type != DistributedType.MULTI_CPU:
        return
    acc.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin
    if acc.state.mixed_precision != "no":
        plugin.set_mixed_precision(acc.state.mixed_precision)
    if not (acc.distributed_type == DistributedType.FSDP and acc.is_fsdp2):
        raise ConfigError(f"accelerate {_accelerate_version()} did not take dpokit's FSDP2 set-up on CPU; launch on "
                          "GPUs or use the DDP config (examples/accelerate/ddp.yaml)")


def _has_accelerator_device() -> bool:
    if torch.cuda.is_available():
        return True
    from accelerate.utils import is_hpu_available, is_mlu_available, is_npu_available, is_xpu_available

    return any(check() for check in (is_xpu_available, is_npu_available, is_mlu_available, is_hpu_available))


def engine_name(acc) -> str:
    """'single', 'ddp', 'fsdp' or 'deepspeed'."""
    from accelerate.utils import DistributedType

    kind = acc.distributed_type
    if kind == DistributedType.FSDP:
        return "fsdp"
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    return "ddp" if acc.num_processes > 1 else "single"


def check_engine(acc) -> None:
    """Refuse launches that would silently run something other than what was asked for."""
    from accelerate.utils import DistributedType

    asked_fsdp, asked_ds = _asked("ACCELERATE_USE_FSDP"), _asked("ACCELERATE_USE_DEEPSPEED")
    if asked_fsdp and acc.num_processes > 1 and acc.distributed_type != DistributedType.FSDP:
        raise ConfigError(f"FSDP was requested but accelerate set up {acc.distributed_type.value} on "
                          f"{acc.device.type}; launch with examples/accelerate/fsdp.yaml")
    if asked_ds or acc.distributed_type == DistributedType.DEEPSPEED:
        # DeepSpeed's engine steps the optimizer inside backward(): dpokit's global-weight loss normalisation over
        # accumulated micro-batches and its check for non-finite gradients before the update cannot run there.
        raise ConfigError("DeepSpeed is not supported by this dpokit version (its engine steps the optimizer inside "
                          "backward, bypassing dpokit's accumulation and non-finite checks); use "
                          "examples/accelerate/fsdp.yaml for sharded training")


def _accelerate_version() -> str:
    import accelerate

    return accelerate.__version__


def rank_part(items: Sequence[int], sizes: Sequence[int], rank: int, world: int) -> list[int]:
    """This rank's part of one global micro-batch (`items`, example indices; `sizes`, their token counts).

    Parts are disjoint, cover `items`, and hold equal counts (the first `len % world` ranks one more), so no rank
    exceeds `per_device_train_batch_size`; within that, the longest examples go first to the rank with the fewest
    tokens so far, which keeps the ranks' token loads (hence step times) close. Which rank computes which example
    changes no number: the step's loss is a global sum divided by a global weight. Each part keeps dataset order.
    """
    n = len(items)
    capacity = [n // world + (1 if r < n % world else 0) for r in range(world)]
    load, parts = [0] * world, [[] for _ in range(world)]
    # Stable sort: equal lengths keep their order, so the split is a pure function of the batch (same on every rank).
    for i in sorted(range(n), key=lambda i: -sizes[i]):
        r = min((r for r in range(world) if len(parts[r]) < capacity[r]), key=lambda r: (load[r], r))
        parts[r].append(i)
        load[r] += sizes[i]
    return [items[i] for i in sorted(parts[rank])]


def all_reduce_sum(acc, values: Sequence[float]) -> list[float]:
    """Sum floats over all ranks (float64, one collective); the identity on one process."""
    if acc.num_processes == 1:
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64, device=acc.device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def all_reduce_max(acc, value: int) -> int:
    if acc.num_processes == 1:
        return int(value)
    t = torch.tensor([value], dtype=torch.int64, device=acc.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def reduce_meter(acc, sums: dict, weights: dict) -> tuple[dict, dict]:
    """Weighted metric sums and weights summed over ranks. Every rank must hold the same metric names, so the names
    are agreed first (a rank whose part was empty has none)."""
    if acc.num_processes == 1:
        return dict(sums), dict(weights)
    names = sorted(set().union(*gather_objects(acc, sorted(sums))))
    totals = all_reduce_sum(acc, [sums.get(k, 0.0) for k in names] + [weights.get(k, 0.0) for k in names])
    return dict(zip(names, totals[:len(names)])), dict(zip(names, totals[len(names):]))


def gather_objects(acc, obj) -> list:
    """`obj` from every rank, in rank order."""
    if acc.num_processes == 1:
        return [obj]
    out = [None] * acc.num_processes
    torch.distributed.all_gather_object(out, obj)
    return out


def gather_rows(acc, table: torch.Tensor) -> torch.Tensor:
    """Merge per-rank tables of per-row values where each rank filled only its own rows (NaN elsewhere): every rank
    ends with the full table, rows in dataset order. float32 values travel exactly (no arithmetic is involved)."""
    if acc.num_processes == 1:
        return table
    parts = gather_objects(acc, table.cpu())
    full = parts[0].clone()
    for part in parts[1:]:
        filled = ~torch.isnan(part)
        full[filled] = part[filled]
    return full
