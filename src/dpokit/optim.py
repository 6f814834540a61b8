"""The optimizer and the learning-rate schedule of a training run: AdamW over two parameter groups (weight decay on
matrices, none on biases and norms, as transformers does) and one of transformers' schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from dpokit.config import steps_from
from dpokit.errors import ConfigError


def group_names(model: nn.Module, prefix: str = "model.") -> list[list[str]]:
    """The names of the trained parameters in each of the optimizer's groups (weight decay, none), empty ones
    included; with `prefix`, as the optimizer state's keys name them (PolicyCall's attribute)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            ndim = len(getattr(p, "ds_shape", p.shape))  # ZeRO-3 leaves a flat partition; its shape is ds_shape
            (no_decay if ndim < 2 or "norm" in name.lower() else decay).append(prefix + name)
    return [decay, no_decay]


def make_optimizer(model: nn.Module, cfg, engine, device: torch.device, total_steps: int):
    """(optimizer, scheduler) for `total_steps` optimizer steps; `engine` may drop empty groups (DeepSpeed)."""
    from transformers import get_scheduler

    params = dict(model.named_parameters())
    decay, no_decay = ([params[n] for n in names] for names in group_names(model, prefix=""))
    groups = engine.param_groups([{"params": decay, "weight_decay": cfg.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}])
    # The same update either way; the fused kernel only where torch has it for the device (CUDA).
    fused = cfg.optim == "adamw_torch_fused" and device.type == "cuda"
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_epsilon, fused=fused)
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
