"""One training run over several processes (accelerate's DDP, FSDP or DeepSpeed ZeRO-2/3) with the numbers of a
single process.

The rules that make N processes equal one process whose per-device batch is N times larger:

- the data order is global: each micro-step takes the next `per_device_train_batch_size x num_processes` examples of
  the epoch's permutation (exactly the micro-batch a single process with that batch size would take), and each rank
  takes its own disjoint part of it (`rank_part`);
- the loss of an optimizer step is the sum over the *global* batch divided by the *global* weight (pairs or tokens,
  all-reduced once per step); DDP, FSDP and DeepSpeed average gradients over ranks, so each rank backpropagates
  `local_sum * num_processes / global_weight`;
- every rank runs the same number of forward/backward passes per step (a rank whose part is empty runs a zero-weight
  pass), because the engines' collectives must pair up;
- metrics are summed with their weights across ranks before they are logged.

The policy is called through `PolicyCall` so that the engine's forward hooks run (DDP's gradient all-reduce, FSDP's
parameter all-gather) even though `dpokit.logps` calls the decoder and the LM head directly.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from dpokit.errors import ConfigError


class PolicyCall(nn.Module):
    """`PolicyCall(model)(fn, *args, **kw) == fn(model, *args, **kw)`, as a module forward.

    accelerate wraps *this* module (DDP, FSDP, DeepSpeed); calling it runs the wrapper's forward, hence its hooks, and then any
    log-prob function on the inner Hugging Face / peft model (`completion_logps`, the packed path, an adapter-off
    reference pass). `model` stays the plain model for saving and for peft's `disable_adapter`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        # accelerate's FSDP transformer auto-wrap reads the root module's block classes (e.g. LlamaDecoderLayer).
        from dpokit.models import base_model

        self._no_split_modules = getattr(base_model(model), "_no_split_modules", None)

    def forward(self, fn: Callable, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


def make_accelerator(cfg: Any):
    """An `Accelerator` for this launch. Under `torchrun` or `accelerate launch --cpu` on a machine without an
    accelerator, accelerate needs `cpu=True` to set up gloo (without it every process silently runs alone).
    `cfg` (a TrainConfig) supplies the precision (`bf16`, `fp16`, `tf32`), `use_cpu` and the process-group / DDP
    settings (`ddp_*`)."""
    from accelerate import Accelerator

    if cfg.fp16 and not torch.cuda.is_available():
        raise ConfigError("fp16 needs a CUDA GPU; on CPU use bf16 or neither")
    if cfg.tf32 is not None:
        if cfg.tf32 and not torch.cuda.is_available():
            raise ConfigError("tf32 needs an Ampere or newer NVIDIA GPU; on CPU leave it unset")
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    mixed_precision = "bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "no"
    # accelerate's state is process-wide and refuses a second Accelerator of another precision; transformers'
    # TrainingArguments resets it for each run, and so does dpokit (several runs, or a sweep, in one process). The
    # process group, once made, is kept by torch and joined again.
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    use_cpu = cfg.use_cpu
    on_cpu = use_cpu or not _has_accelerator_device()
    if _asked("ACCELERATE_USE_DEEPSPEED"):
        if use_cpu:
            raise ConfigError("use_cpu is set but the launch asks for DeepSpeed; launch without a DeepSpeed config")
        return _deepspeed_accelerator(mixed_precision, cpu=on_cpu, cfg=cfg)
    cpu = use_cpu or (on_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1)
    plugin = None
    if cpu and _asked("ACCELERATE_USE_FSDP"):
        plugin = _cpu_fsdp_plugin()
    acc = Accelerator(mixed_precision=mixed_precision, cpu=cpu, kwargs_handlers=_handlers(cfg),
                      **({"fsdp_plugin": plugin} if plugin else {}))
    if plugin is not None:
        _enable_fsdp_on_cpu(acc, plugin)
    check_engine(acc)
    return acc


def _handlers(cfg: Any, backend: Optional[str] = None) -> list:
    """accelerate's kwargs handlers for the process group (backend, timeout) and DDP, from the config's `ddp_*`
    fields; only what the config sets, so torch's and accelerate's defaults stay otherwise."""
    from datetime import timedelta

    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    group = {"timeout": timedelta(seconds=cfg.ddp_timeout)}
    if cfg.ddp_backend or backend:
        group["backend"] = cfg.ddp_backend or backend
    ddp = {name: getattr(cfg, f"ddp_{name}") for name in ("find_unused_parameters", "bucket_cap_mb",
                                                          "broadcast_buffers", "static_graph")
           if getattr(cfg, f"ddp_{name}") is not None}
    return [InitProcessGroupKwargs(**group)] + ([DistributedDataParallelKwargs(**ddp)] if ddp else [])


def _deepspeed_accelerator(mixed_precision: str, cpu: bool, cfg: Any):
    """The `Accelerator` of an `accelerate launch` with a DeepSpeed config (examples/accelerate/zero2.yaml, zero3.yaml).

    On CPU (the tests: gloo, 2 processes) two things differ from a GPU launch: accelerate picks no process-group
    backend for DeepSpeed without a GPU (and `cpu=True` would turn DeepSpeed off), so gloo is named here, else every
    process silently runs alone; and DeepSpeed's CPU accelerator would JIT-compile a shared-memory all-reduce op with
    g++ at start (about 90 s) for a speed-up that does not matter at test sizes, so it is skipped."""
    from accelerate import Accelerator

    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("the accelerate config asks for DeepSpeed, which is not installed: "
                          "pip install 'dpokit[deepspeed]' (or use examples/accelerate/fsdp.yaml)")
    if mixed_precision == "fp16":
        # DeepSpeed's fp16 loss scaler skips overflowing updates inside its engine, and dpokit cannot tell those from
        # real non-finite gradients there; bf16 needs no scaler.
        raise ConfigError("fp16 is not supported under DeepSpeed in dpokit; use bf16")
    if cpu:
        import importlib
        import sys

        importlib.import_module("deepspeed.comm.torch")
        # `import deepspeed.comm.torch as m` would give torch itself (the package re-exports it under that name).
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    acc = Accelerator(mixed_precision=mixed_precision, kwargs_handlers=_handlers(cfg, "gloo" if cpu else None))
    check_engine(acc)
    plugin = acc.state.deepspeed_plugin
    if plugin.zero_stage == 3 and plugin.zero3_init_flag:
        raise ConfigError("zero3_init_flag: true is not supported by dpokit (it loads the whole model on every "
                          "process before DeepSpeed shards it, e.g. to copy the reference); set zero3_init_flag: "
                          "false in the accelerate config (examples/accelerate/zero3.yaml)")
    # accelerate registers its DeepSpeed config with transformers, whose from_pretrained then builds the model
    # already partitioned under ZeRO-3 (zero.Init) whatever zero3_init_flag says; dpokit needs the whole model.
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
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


def check_engine(acc) -> None:
    """Refuse launches that would silently run something other than what was asked for."""
    from accelerate.utils import DistributedType

    asked_fsdp, asked_ds = _asked("ACCELERATE_USE_FSDP"), _asked("ACCELERATE_USE_DEEPSPEED")
    if asked_fsdp and acc.num_processes > 1 and acc.distributed_type != DistributedType.FSDP:
        raise ConfigError(f"FSDP was requested but accelerate set up {acc.distributed_type.value} on "
                          f"{acc.device.type}; launch with examples/accelerate/fsdp.yaml")
    if asked_ds and acc.distributed_type != DistributedType.DEEPSPEED:
        raise ConfigError(f"DeepSpeed was requested but accelerate set up {acc.distributed_type.value} on "
                          f"{acc.device.type}; launch with examples/accelerate/zero2.yaml or zero3.yaml")
    if acc.distributed_type == DistributedType.DEEPSPEED:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if acc.num_processes != world:
            raise ConfigError(f"DeepSpeed: accelerate set up {acc.num_processes} process(es) of the {world} "
                              "launched (no process group); launch with accelerate launch and a DeepSpeed config")
        stage = int(acc.state.deepspeed_plugin.zero_stage)
        if stage not in (2, 3):
            raise ConfigError(f"DeepSpeed ZeRO stage {stage} is not supported by dpokit; use zero_stage 2 or 3")


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
