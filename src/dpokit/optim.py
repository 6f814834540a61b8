"""The optimizer and the learning-rate schedule of a training run: AdamW over two parameter groups (weight decay on
matrices, none on biases and norms, as transformers does) and one of transformers' schedules."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from dpokit.config import steps_from
from dpokit.errors import ConfigError
from dpokit.metrics import log


def group_names(model: nn.Module, prefix: str = "model.") -> list[list[str]]:
    """The names of the trained parameters in each of the optimizer's groups (weight decay, none), empty ones
    included; with `prefix`, as the optimizer state's keys name them (PolicyCall's attribute)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            ndim = len(getattr(p, "ds_shape", p.shape))  # ZeRO-3 leaves a flat partition; its shape is ds_shape
            (no_decay if ndim < 2 or "norm" in name.lower() else decay).append(prefix + name)
    return [decay, no_decay]


# Where `adamw_torch_fused` runs torch's fused kernel (the same update, one kernel for all tensors). CPU keeps the
# foreach path it has always had, so CPU runs' numbers do not move with the torch version (CPU fused came in 2.4).
FUSED_DEVICES = ("cuda",)


def fused_adamw_refusal(params: list) -> Optional[str]:
    """Why this torch's fused AdamW cannot update `params` (None: it can). A one-element probe per device and dtype
    takes one step, so an unsupported combination shows here, before the run, not at the first optimizer step
    (torch checks fused support lazily, in `step`)."""
    for device, dtype in sorted({(p.device, p.dtype) for p in params}, key=str):
        probe = torch.zeros(1, device=device, dtype=dtype, requires_grad=True)
        probe.grad = torch.zeros_like(probe)
        try:
            torch.optim.AdamW([probe], fused=True).step()
        except (RuntimeError, TypeError, ValueError) as exc:
            text = str(exc).strip().splitlines()
            reason = text[0] if text else type(exc).__name__
            return f"{str(dtype).removeprefix('torch.')} parameters on {device}: {reason}"
    return None


def make_optimizer(model: nn.Module, cfg, engine, device: torch.device, total_steps: int):
    """(optimizer, scheduler) for `total_steps` optimizer steps; `engine` may drop empty groups (DeepSpeed)."""
    from transformers import get_scheduler

    params = dict(model.named_parameters())
    decay, no_decay = ([params[n] for n in names] for names in group_names(model, prefix=""))
    groups = engine.param_groups([{"params": decay, "weight_decay": cfg.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}])
    fused = cfg.optim == "adamw_torch_fused" and device.type in FUSED_DEVICES
    if fused:
        refusal = fused_adamw_refusal(decay + no_decay)
        fused = refusal is None
        log(f"optimizer, torch {torch.__version__}, {device.type}: "
            + ("fused AdamW" if fused else f"AdamW (foreach), not fused: {refusal}"))
    # fused=None, not False, otherwise: torch then takes its default (foreach on CUDA); an explicit False would also
    # turn foreach off and step each tensor on its own.
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_epsilon, fused=True if fused else None)
    warmup = (steps_from(cfg.warmup_steps, total_steps) if cfg.warmup_steps > 0
              else math.ceil(cfg.warmup_ratio * total_steps))
    try:
        scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                                  num_training_steps=total_steps,
                                  scheduler_specific_kwargs=cfg.lr_scheduler_kwargs or None)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"lr_scheduler_kwargs {cfg.lr_scheduler_kwargs} for {cfg.lr_scheduler_type!r}: "
                          f"{str(exc).splitlines()[0]}") from None
    return optimizer, scheduler
