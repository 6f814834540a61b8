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
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._no_split_modules = getattr(base, "_no_split_modules", None)

    def forward(self, fn: Callable, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


def make_accelerator(mixed_precision: str, cfg: Any):
    """An `Accelerator` for this launch. Under `torchrun` or `accelerate launch --cpu` on a machine without an
    accelerator, accelerate needs `cpu=True` to set up gloo (without it every process silently runs alone).
    `cfg` (a TrainConfig) supplies `use_cpu` and the process-group / DDP settings (`ddp_*`)."""
    from accelerate import Accelerator

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


def configure_deepspeed(acc, *, micro_batch_size: int, gradient_accumulation_steps: int,
                        max_grad_norm: float) -> None:
    """Fill the DeepSpeed config with dpokit's values before `prepare` builds the engine.

    dpokit prepares no dataloader, so DeepSpeed cannot infer the micro-batch size ("auto" would fail); clipping
    happens inside DeepSpeed's step, so it takes dpokit's `max_grad_norm`; under ZeRO-3 the final model is gathered
    from the shards (`stage3_gather_16bit_weights_on_model_save`). DeepSpeed's gradient accumulation count only
    checks the batch arithmetic here: dpokit marks each step's last micro-batch itself (their number may vary with
    token_budget) and scales the loss itself."""
    config = acc.state.deepspeed_plugin.deepspeed_config
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise ConfigError(f"the DeepSpeed config sets a {key}; remove it: dpokit builds its own AdamW and "
                              "learning-rate schedule from its config")
    config["train_micro_batch_size_per_gpu"] = micro_batch_size
    config["gradient_accumulation_steps"] = gradient_accumulation_steps
    config["train_batch_size"] = micro_batch_size * gradient_accumulation_steps * acc.num_processes
    config["gradient_clipping"] = float(max_grad_norm or 0.0)
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    # DeepSpeed would refuse a torch optimizer under CPU offload otherwise; dpokit's AdamW is a torch one.
    config.setdefault("zero_force_ds_cpu_optimizer", False)
    acc.gradient_accumulation_steps = gradient_accumulation_steps


def deepspeed_grad_norm(policy) -> float:
    """The global gradient norm (before clipping) of the update the DeepSpeed engine just made."""
    norm = policy.get_global_grad_norm()
    return float(norm.item() if hasattr(norm, "item") else norm) if norm is not None else float("nan")


def deepspeed_fp32_weights(acc, engine, state: Optional[dict]) -> Optional[dict]:
    """`state` (the engine's gathered 16-bit weights: DeepSpeed runs the module in bf16) with each trained parameter
    replaced by DeepSpeed's float32 master copy, so the saved model is float32 as under the other engines. A
    collective (every rank gathers every trained parameter, in the same order); rank 0 keeps the result."""
    from deepspeed.utils import safe_get_full_fp32_param

    for name, param in acc.unwrap_model(engine).named_parameters():
        if not param.requires_grad:
            continue
        full = safe_get_full_fp32_param(param)
        if full is not None and state is not None and name in state:
            state[name] = full.detach().cpu()
    return state


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


# ----- DeepSpeed checkpoints in dpokit's engine-independent format -----
#
# dpokit's checkpoints hold the full weights and the full optimizer state keyed by parameter name (the format of
# torch.distributed.checkpoint's `get_optimizer_state_dict(..., full_state_dict=True)`), so that any engine and any
# number of processes resumes them. Under ZeRO-2/3 the float32 master weights and Adam's moments live in DeepSpeed's
# flat per-rank partitions; DeepSpeed's tensor-fragment API (`deepspeed.utils.safe_*_full_*`, collectives over the
# partitions) gathers each parameter's full tensor and scatters it back. Every rank calls these functions, and they
# visit the trained parameters in the same order on every rank.

def _zero_optimizer(engine):
    return engine.optimizer  # DeepSpeedZeroOptimizer (stage 2) or DeepSpeedZeroOptimizer_Stage3


def _zero_flat_partitions(zero) -> list:
    """This rank's flat float32 partitions: the parameters of DeepSpeed's inner (torch) optimizer."""
    if hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO-3: one per sub-group
        return list(zero.fp32_partitioned_groups_flat)
    return list(zero.single_partition_of_fp32_groups)  # ZeRO-1/2: one per parameter group


def _link_optimizer_state(zero) -> None:
    """ZeRO-1/2: (re)build each parameter's views of Adam's state in the flat partitions. DeepSpeed links them only
    once, and may do so before the torch optimizer has created its state (then the views are empty)."""
    if hasattr(zero, "_hp_optimizer_states_linked"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def _trained(acc, engine) -> list:
    return [(name, p) for name, p in acc.unwrap_model(engine).named_parameters() if p.requires_grad]


def deepspeed_optimizer_state(acc, engine, group_names: list) -> Optional[dict]:
    """The full optimizer state keyed by parameter name, as `get_optimizer_state_dict(model, optimizer,
    StateDictOptions(full_state_dict=True, cpu_offload=True))` gives it without DeepSpeed ({"state": {name: {"step",
    "exp_avg", "exp_avg_sq"}}, "param_groups": [{hyperparameters..., "params": [names]}]}). `group_names` lists the
    parameter names of each of dpokit's parameter groups, empty ones included (DeepSpeed drops those), so the
    layout is the one the other engines build. A collective; rank 0 receives the state (others get None)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    zero = _zero_optimizer(engine)
    inner = zero.optimizer
    flats = _zero_flat_partitions(zero)
    steps = [inner.state[f]["step"] for f in flats if f in inner.state and "step" in inner.state[f]]
    if not steps:
        raise RuntimeError("DeepSpeed's optimizer has no state yet (no step was taken)")
    step = steps[0]
    step = (step.detach().clone().cpu().float() if torch.is_tensor(step) else torch.tensor(float(step)))
    _link_optimizer_state(zero)
    main = acc.is_main_process
    state = {}
    for name, param in _trained(acc, engine):
        entry = {"step": step.clone()}
        for key in ("exp_avg", "exp_avg_sq"):
            full = safe_get_full_optimizer_state(param, key)
            if full is None:
                raise RuntimeError(f"DeepSpeed holds no {key} for {name}")
            if main:
                entry[key] = full.detach().float().cpu().reshape(param.ds_shape if hasattr(param, "ds_shape")
                                                                  else param.shape)
        if main:
            state[name] = entry
    if not main:
        return None
    groups, kept = [], iter(inner.param_groups)
    for names in group_names:
        hyper = next(kept) if names else None
        if hyper is None:  # an empty group (DeepSpeed has none): the hyperparameters of the first, no weight decay
            hyper = {**inner.param_groups[0], "weight_decay": 0.0}
        groups.append({**{k: v for k, v in hyper.items() if k != "params"}, "params": list(names)})
    return {"state": state, "param_groups": groups}


def deepspeed_load_state(acc, engine, weights: dict, optimizer: dict, group_names: list) -> None:
    """Put full float32 weights (`weights`: trained parameter name -> tensor, every rank holds them all) and a full
    name-keyed optimizer state (see `deepspeed_optimizer_state`; any engine's) into DeepSpeed's partitions, then
    refresh the module's (bf16 or partitioned) weights from the new master copy. Learning rates come from the
    saved parameter groups (the schedule itself is restored by dpokit). A collective."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    zero = _zero_optimizer(engine)
    inner = zero.optimizer
    saved_state = optimizer["state"]
    trained = _trained(acc, engine)
    missing = [n for n, _ in trained if n not in weights or n not in saved_state]
    if missing:
        from dpokit.checkpoint import CheckpointError

        raise CheckpointError(f"the checkpoint has no weights or optimizer state for {missing[:3]}; resume with the "
                              "run's own model")
    # DeepSpeed's torch optimizer creates Adam's state lazily at its first step; a resume comes before that, so the
    # state is created here (zeros, then filled) and DeepSpeed's per-parameter views of it are linked again.
    step = saved_state[trained[0][0]]["step"] if trained else torch.tensor(0.0)
    # (ZeRO-3 lists its partitions in the torch optimizer's groups only while it steps or saves, hence not from there.)
    on_device = any(g.get("fused") or g.get("capturable") for g in inner.param_groups)
    for flat in _zero_flat_partitions(zero):
        slot = inner.state[flat]
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in slot:
                slot[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)
        slot["step"] = torch.as_tensor(step, dtype=torch.float32).detach().clone().to(
            flat.device if on_device else "cpu")
    _link_optimizer_state(zero)
    device = acc.device
    for name, param in trained:
        safe_set_full_fp32_param(param, weights[name].to(device=device, dtype=torch.float32))
        for key in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(param, saved_state[name][key].to(device=device, dtype=torch.float32), key)
    # The module's weights (bf16 copies, or ZeRO-3's partitions) from the float32 master copy.
    if hasattr(zero, "fp32_partitioned_groups_flat"):
        for sub_group in range(len(zero.fp16_groups)):
            zero._reassign_or_swap_out_partitioned_parameters(sub_group)
    else:
        zero.update_lp_params()
    # Learning rates (and the other hyperparameters the config fixes) from the saved group holding the same
    # parameters; DeepSpeed's groups are dpokit's non-empty ones, in order.
    by_name = {}
    for saved in optimizer["param_groups"]:
        for n in saved["params"]:
            by_name[n] = saved
    kept = [names for names in group_names if names]
    for group, names in zip(inner.param_groups, kept):
        saved = by_name.get(names[0])
        if saved is not None:
            for key in ("lr", "initial_lr"):
                if key in saved and key in group:
                    group[key] = saved[key]
