"""Engines: how this process takes part in an optimizer step and in a checkpoint, behind one small interface.

`Engine` is single-process training and accelerate's DDP; `FSDPEngine` (FSDP2) and `DeepSpeedEngine` (ZeRO-2/3)
override what they do differently. The training loop calls these methods and never asks which engine it has: the
backward of a micro-batch (knowing whether it is the step's last), clipping and the gradient norm, whether an update
can still be skipped once backward has run, and the full weights and optimizer state gathered for a checkpoint and
scattered back on resume. Checkpoints hold full, name-keyed tensors, so any engine resumes any other's.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from dpokit.errors import ConfigError

PREFIX = "model."  # the attribute of `PolicyCall`, the module every engine wraps


def _inner_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


class Engine:
    """Single process and DDP: every rank holds the whole model; gradients are averaged in the last backward."""

    # Whether the update happens inside the step's last backward (DeepSpeed): a non-finite gradient norm can then
    # only be reported, no longer kept out of the weights.
    updates_in_backward = False

    def __init__(self, accelerator):
        self.accelerator = accelerator
        # accelerate keeps the precision in process-wide state, which the next run's Accelerator replaces (several
        # runs in one process, `dpokit sweep bf16=false,true`): this run's is read once, now.
        self.mixed_precision = accelerator.mixed_precision

    @property
    def name(self) -> str:
        return "ddp" if self.accelerator.num_processes > 1 else "single"

    # ----- before any work -----
    def check(self, cfg) -> None:
        """Refuse, before any model loads, what this engine cannot do."""

    def param_groups(self, groups: list[dict]) -> list[dict]:
        return groups

    def prepare(self, policy: nn.Module, optimizer, cfg):
        return self.accelerator.prepare(policy, optimizer)

    def autocast(self, bf16: bool):
        # What accelerate's `Accelerator.autocast` does, with this run's precision rather than the process's latest.
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mixed_precision)
        return torch.autocast(self.accelerator.device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    # ----- one optimizer step -----
    def accumulating(self, policy: nn.Module, last: bool):
        """Gradients are synchronised over ranks only in the backward of the step's last micro-batch."""
        return contextlib.nullcontext() if last else self.accelerator.no_sync(policy)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.accelerator.backward(loss)

    def abandon(self, loss: torch.Tensor, last: bool) -> None:
        """A step stopped after its forward (a non-finite loss on some rank): DDP and FSDP expect the synchronised
        forward's backward, so it runs with no effect on the weights."""
        if last:
            self.accelerator.backward(loss * 0.0)

    def grad_norm(self, params: list, max_norm: float) -> float:
        """Clip the global gradient norm to `max_norm` (0: no clipping); the norm before clipping."""
        if max_norm and max_norm > 0:
            return float(self.accelerator.clip_grad_norm_(params, max_norm))
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))

    # ----- checkpoints -----
    def full_weights(self, policy: nn.Module, bf16: bool) -> Optional[dict]:
        """The model's full state dict for saving (a collective where the weights are sharded; rank 0 receives the
        tensors), or None when every rank holds the whole model and `save_pretrained` reads it directly."""
        return None

    def _optimizer_module(self, policy: nn.Module) -> nn.Module:
        """The module whose parameter names key the optimizer state."""
        return self.accelerator.unwrap_model(policy)

    def optimizer_state(self, policy: nn.Module, optimizer, group_names: list) -> dict:
        """The full optimizer state keyed by parameter name (not by position), so a checkpoint written by one engine
        or number of processes loads into another. A collective under FSDP and DeepSpeed."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self._optimizer_module(policy), _inner_optimizer(optimizer),
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_state(self, model: nn.Module, policy: nn.Module, optimizer, ckpt: Path, optimizer_state: dict,
                   group_names: list, peft: bool) -> None:
        """Put the weights of checkpoint `ckpt` and its full, name-keyed optimizer state back (a collective where
        the state is sharded)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        self._load_weights(model, policy, ckpt, peft)
        set_optimizer_state_dict(self._optimizer_module(policy), _inner_optimizer(optimizer), optimizer_state,
                                 options=StateDictOptions(full_state_dict=True))

    def load_weights(self, model: nn.Module, policy: nn.Module, ckpt: Path, peft: bool) -> None:
        """Put the weights of checkpoint `ckpt` back into the policy (e.g. the best model at the end)."""
        self._load_weights(model, policy, ckpt, peft)

    def _load_weights(self, model: nn.Module, policy: nn.Module, ckpt: Path, peft: bool) -> None:
        from dpokit.checkpoint import load_weights

        load_weights(model, ckpt, peft=peft)

    def scheduler_state(self, state: dict, group_names: list) -> dict:
        return state

    def load_scheduler_state(self, state: dict, group_names: list) -> dict:
        return state


def refuse_qlora(cfg, engine: str) -> None:
    """QLoRA runs on one GPU or under DDP: sharding bitsandbytes' 4-bit weights is not dpokit's."""
    if getattr(cfg, "load_in_4bit", False):
        raise ConfigError(f"load_in_4bit (QLoRA) is not supported under {engine}; run it on one GPU or with DDP "
                          "(accelerate launch --config_file examples/accelerate/ddp.yaml)")


class FSDPEngine(Engine):
    """FSDP2: each rank holds a shard of every parameter; saving gathers, resuming scatters."""

    name = "fsdp"  # type: ignore[assignment]

    def check(self, cfg) -> None:
        refuse_qlora(cfg, "FSDP")

    def full_weights(self, policy: nn.Module, bf16: bool) -> Optional[dict]:
        state = self.accelerator.get_state_dict(policy)
        return {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}

    def _optimizer_module(self, policy: nn.Module) -> nn.Module:
        return policy  # the engine's root: FSDP keys the state by its own names

    def _load_weights(self, model, policy, ckpt, peft) -> None:
        """The checkpoint's full weights (every rank reads the files) scattered into this rank's shards."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        from dpokit.checkpoint import named_weights

        set_model_state_dict(policy, {PREFIX + k: v for k, v in named_weights(model, ckpt, peft).items()},
                             options=StateDictOptions(full_state_dict=True, strict=False))


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO-2/3: the engine clips and applies the update inside the backward of the step's last micro-batch,
    and runs the policy in bf16 itself; the float32 master weights and Adam's moments live in its partitions."""

    name = "deepspeed"  # type: ignore[assignment]
    updates_in_backward = True

    def check(self, cfg) -> None:
        refuse_qlora(cfg, "DeepSpeed")
        if cfg.load_best_model_at_end:
            raise ConfigError("load_best_model_at_end is not supported under DeepSpeed (the weights live in its "
                              "partitions); use FSDP or DDP, or load the best checkpoint-N yourself")
        if cfg.on_nonfinite == "skip":
            raise ConfigError("on_nonfinite=skip is not supported under DeepSpeed (its engine applies the update "
                              "inside backward, so an update cannot be skipped); use on_nonfinite=stop, or FSDP/DDP")

    def param_groups(self, groups: list[dict]) -> list[dict]:
        # ZeRO-3 drops empty parameter groups from the optimizer (e.g. LoRA has no 1-D parameters), and the schedule
        # must see the groups DeepSpeed keeps.
        return [g for g in groups if g["params"]]

    def prepare(self, policy, optimizer, cfg):
        configure_deepspeed(self.accelerator, micro_batch_size=cfg.per_device_train_batch_size,
                            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                            max_grad_norm=cfg.max_grad_norm)
        return super().prepare(policy, optimizer, cfg)

    def autocast(self, bf16: bool):
        if bf16:
            # DeepSpeed runs the policy in bf16 itself (accelerate's autocast is then a no-op); a separate float32
            # reference model, not wrapped by the engine, still needs autocast to be computed in bf16 like it.
            return torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16)
        return super().autocast(bf16)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        # The last micro-batch's backward runs DeepSpeed's step: clip, update, zero the gradients. dpokit scales the
        # loss itself (global weight), so DeepSpeed must not divide it again.
        self.accelerator.deepspeed_engine_wrapped.backward(loss, sync_gradients=last, scale_wrt_gas=False)

    def abandon(self, loss: torch.Tensor, last: bool) -> None:
        pass  # DeepSpeed pairs no collective with the forward

    def grad_norm(self, params: list, max_norm: float) -> float:
        """The norm (before clipping) of the update the engine has just applied."""
        norm = self.accelerator.deepspeed_engine_wrapped.engine.get_global_grad_norm()
        return float(norm.item() if hasattr(norm, "item") else norm) if norm is not None else float("nan")

    def full_weights(self, policy: nn.Module, bf16: bool) -> Optional[dict]:
        state = self.accelerator.get_state_dict(policy)
        if bf16:
            state = deepspeed_fp32_weights(self.accelerator, policy, state)
        if state is None:  # ZeRO-3 hands the gathered weights to rank 0 only
            return None
        return {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}

    def optimizer_state(self, policy, optimizer, group_names) -> dict:
        return deepspeed_optimizer_state(self.accelerator, policy, group_names)

    def load_state(self, model, policy, optimizer, ckpt, optimizer_state, group_names, peft) -> None:
        # Frozen weights (a LoRA base) never change, so the loaded model has them already.
        from dpokit.checkpoint import named_weights

        deepspeed_load_state(self.accelerator, policy, {PREFIX + k: v for k, v in named_weights(model, ckpt, peft).items()},
                             optimizer_state, group_names)

    def scheduler_state(self, state: dict, group_names: list) -> dict:
        """One entry per dpokit parameter group, empty ones included: DeepSpeed drops empty groups (LoRA has no 1-D
        parameters), so its per-group lists are widened to the other engines' layout, the dropped group taking the
        first kept group's values (the same schedule)."""
        keep = [bool(names) for names in group_names]
        if all(keep):
            return state
        state = dict(state)
        for key, value in list(state.items()):
            if isinstance(value, list) and len(value) == sum(keep):
                kept = iter(value)
                state[key] = [next(kept) if k else copy.deepcopy(value[0]) for k in keep]
        return state

    def load_scheduler_state(self, state: dict, group_names: list) -> dict:
        """`scheduler_state`'s inverse: only the entries of the groups DeepSpeed keeps."""
        keep = [bool(names) for names in group_names]
        if all(keep):
            return state
        return {key: [v for v, k in zip(value, keep) if k] if isinstance(value, list) and len(value) == len(keep)
                else value for key, value in state.items()}


def make_engine(accelerator) -> Engine:
    """The engine of this launch, from accelerate's distributed type."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return FSDPEngine(accelerator)
    if kind == DistributedType.DEEPSPEED:
        return DeepSpeedEngine(accelerator)
    return Engine(accelerator)


# --------------------------------------------------------------------------------------------------------------------
# DeepSpeed


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

