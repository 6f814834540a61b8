"""The training loop: setup -> step -> evaluate -> save, for SFT and for DPO and its family.

`Trainer` owns everything both share (model and tokenizer loading, LoRA, the optimizer, the schedule, gradient
accumulation, logging, checkpoints); `SFTTrainer` and `DPOTrainer` only say how data becomes batches and how a batch
becomes a loss. The loss itself comes from `dpokit.losses`; this module reads only its spec (does it need a reference?
lengths? WPO weights?) and never tests a loss name.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from dpokit import checkpoint as C
from dpokit import data as D
from dpokit import distributed as dist
from dpokit import losses
from dpokit.compat import refuse_trl_arguments
from dpokit.config import DPOConfig, SFTConfig, TrainConfig, config_from_args, steps_from
from dpokit.data.collate import collate_packed, collate_packed_sft, collate_pairs, collate_sft
from dpokit.errors import ConfigError, DataError, DpokitError
from dpokit.packing import batch_logps, enable_packed_attention, pack_by_cost, pack_pairs, pair_tokens
from dpokit.reference import (AdapterOffReference, ModelReference, data_fingerprint, frozen_copy,
                              model_fingerprint, precompute)

RUN_MARKER = "dpokit_config.yaml"  # its presence marks an output_dir holding a run

# Config keys that may differ between a checkpoint and the run resuming from it: they change what is written and where,
# never the numbers. Any other difference is refused (it would silently turn the resume into a different run).
RESUME_MAY_CHANGE = frozenset({
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "logging_steps", "eval_steps", "eval_file",
    "per_device_eval_batch_size", "save_steps", "save_total_limit", "report_to", "disable_tqdm", "on_nonfinite",
    "max_nonfinite_steps", "run_name", "logging_strategy", "logging_first_step", "log_level", "eval_strategy",
    "eval_on_start", "save_strategy", "dataset_test_split", "ddp_timeout", "precompute_ref_batch_size",
})


class NonFiniteError(DpokitError):
    """A NaN/Inf loss or gradient stopped the run before the optimizer step."""


class OutOfMemory(DpokitError):
    """A batch that does not fit in memory; the message names the settings that shrink it."""


_QUIET = {"quiet": False}  # log_level error/critical: notices off (errors are raised, never logged)


def log(msg: str) -> None:
    """Run notices (counts of truncated/dropped rows, substitutions like pad=EOS) go to stdout, from the first
    process only (RANK is set by torchrun / accelerate launch before any dpokit code runs)."""
    if int(os.environ.get("RANK", "0")) == 0 and not _QUIET["quiet"]:
        print(f"[dpokit] {msg}", flush=True)


def set_seed(seed: int, full_determinism: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if full_determinism:
        from transformers import enable_full_determinism

        enable_full_determinism(seed)


# --------------------------------------------------------------------------------------------------------------------
# Setup helpers


def check_source(source: Any, what: str) -> None:
    """A source that is clearly a local path (absolute, ./, ../, ~, or more than one '/') must exist; a hub id
    ("org/name") is left to transformers, which fails offline with its own message."""
    text = str(source)
    local = text.startswith(("/", ".", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text
    if local and not Path(text).expanduser().exists():
        raise DpokitError(f"cannot load {what} {text!r}: no such file or directory")


def load_model(model: Any, cfg: TrainConfig, what: str = "model") -> nn.Module:
    """A path / hub id (loaded with from_pretrained) or an in-memory PreTrainedModel (used as is)."""
    if isinstance(model, nn.Module):
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise ConfigError(f"{what} must be a path, a hub id or a PreTrainedModel, got {type(model).__name__}")
    check_source(model, what)
    from transformers import AutoModelForCausalLM

    kwargs = dict(cfg.model_init_kwargs or {})
    # float32 by default: master weights, with bf16/fp16 from autocast.
    kwargs.setdefault("dtype", cfg.dtype if cfg.dtype == "auto" else getattr(torch, cfg.dtype))
    kwargs.setdefault("trust_remote_code", cfg.trust_remote_code)
    if cfg.attn_implementation is not None:
        kwargs.setdefault("attn_implementation", cfg.attn_implementation)
    if cfg.model_revision != "main":
        kwargs.setdefault("revision", cfg.model_revision)
    try:
        return AutoModelForCausalLM.from_pretrained(str(model), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DpokitError(f"cannot load {what} {str(model)!r}: {first}") from exc


def load_tokenizer(processing_class: Any, model_source: Any, cfg: TrainConfig):
    """The given tokenizer, or one loaded from `tokenizer_name_or_path` / the model's path; pad token set."""
    tok = processing_class
    if tok is None:
        source = cfg.tokenizer_name_or_path or (model_source if isinstance(model_source, (str, os.PathLike)) else None)
        if source is None:
            raise ConfigError("no tokenizer: pass processing_class= or set tokenizer_name_or_path "
                              "(an in-memory model carries none)")
        check_source(source, "model" if source is model_source else "tokenizer")
        from transformers import AutoTokenizer

        try:
            extra = {"revision": cfg.model_revision} if cfg.model_revision != "main" else {}
            tok = AutoTokenizer.from_pretrained(str(source), trust_remote_code=cfg.trust_remote_code, **extra)
        except (OSError, ValueError) as exc:
            raise DpokitError(f"cannot load tokenizer {str(source)!r}: {str(exc).splitlines()[0]}") from exc
    if cfg.chat_template:
        tok.chat_template = read_chat_template(cfg.chat_template)
    for name in ("eos_token", "pad_token"):  # EOS first: without a pad token, padding takes the EOS set here
        value = getattr(cfg, name)
        if value is not None:
            if tok.convert_tokens_to_ids(value) in (None, tok.unk_token_id) and value != tok.unk_token:
                raise ConfigError(f"{name}: {value!r} is not a token of the tokenizer's vocabulary")
            setattr(tok, name, value)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ConfigError("the tokenizer has neither a pad token nor an EOS token; add one")
        # Padding positions are masked out of attention and loss, so any id works; EOS is the usual choice.
        tok.pad_token = tok.eos_token
        log(f"tokenizer has no pad token; using EOS {tok.eos_token!r} (id {tok.eos_token_id}) for padding")
    return tok


def read_chat_template(value: str) -> str:
    """`chat_template`: a Jinja template, or the path of a file holding one. Text without Jinja tags ("{{", "{%") is
    a path, and a missing file is an error (used as a template, the path would render every prompt as itself)."""
    if "{{" in value or "{%" in value:
        return value
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"chat_template: {value!r} is neither a Jinja template nor a file")
    return path.read_text()


def disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if config is not None and isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)


def apply_lora(model: nn.Module, cfg: TrainConfig, peft_config: Any = None) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    if peft_config is None:
        targets = cfg.lora_target_modules
        if isinstance(targets, str) and targets != "all-linear":
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        to_save = cfg.lora_modules_to_save
        if isinstance(to_save, str):
            to_save = [t.strip() for t in to_save.split(",") if t.strip()]
        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules=targets or "all-linear", task_type="CAUSAL_LM",
                                 modules_to_save=to_save or None, use_rslora=cfg.use_rslora, use_dora=cfg.use_dora)
    try:
        return get_peft_model(model, peft_config)
    except ValueError as exc:
        raise ConfigError(f"LoRA: {str(exc).splitlines()[0]}") from exc


def enable_checkpointing(model: nn.Module, kwargs: Optional[dict]) -> None:
    """Activation checkpointing with torch's non-reentrant checkpoint unless asked otherwise; transformers'
    `every_n_layers` / `offload` go to its `activation_checkpointing_enable` (where transformers has it)."""
    kwargs = {"use_reentrant": False, **(kwargs or {})}
    extra = {k: kwargs.pop(k) for k in ("every_n_layers", "offload") if k in kwargs}
    if not hasattr(model, "activation_checkpointing_enable") and not extra:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # transformers before 5.24
        return
    if not hasattr(model, "activation_checkpointing_enable"):
        raise ConfigError(f"gradient_checkpointing_kwargs {sorted(extra)} need a transformers with "
                          "activation_checkpointing_enable (this one has none); drop them")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, **extra)


def compile_layers(model: nn.Module, cfg: TrainConfig) -> None:
    """`torch.compile` each decoder layer in place (the model's `_no_split_modules` classes, e.g. LlamaDecoderLayer):
    the layers share one compiled graph, so compiling takes one layer's time, and the LM head, which dpokit runs in
    its own chunks, stays eager. Dynamic shapes: packed and padded batches change length every step."""
    from dpokit.packing import _base_model

    base = _base_model(model)
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(f"torch_compile: cannot find the decoder layers of {type(base).__name__} (no "
                          "_no_split_modules); turn torch_compile off")
    for layer in layers:
        layer.compile(backend=cfg.torch_compile_backend or "inductor", mode=cfg.torch_compile_mode, dynamic=True)


def _check_writable(output_dir: Path) -> None:
    """An output_dir that is a file, or under a directory this process cannot write, is refused by name."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output_dir {str(output_dir)!r} exists and is not a directory")
    parent = output_dir if output_dir.exists() else next((a for a in output_dir.absolute().parents if a.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {str(output_dir)!r} cannot be written: {str(parent)!r} is not a writable "
                          "directory")


def _transformers_names(record: dict) -> dict:
    """A metrics record with transformers' names for evaluation metrics (``eval/loss`` -> ``eval_loss``)."""
    return {f"eval_{k[len('eval/'):]}" if k.startswith("eval/") else k: v for k, v in record.items()}


def check_vocab(examples, vocab_size: int, where) -> None:
    """Token ids beyond the embedding table would index out of range deep in the model: name the row instead
    (`where(row)` gives its position as data errors do: `file.jsonl:LINE` or `source row N`)."""
    for ex in examples:
        for field_name, ids in vars(ex).items():
            if isinstance(ids, np.ndarray) and len(ids) and int(ids.max()) >= vocab_size:
                raise DpokitError(f"{where(ex.row)}: field {field_name!r} has token id {int(ids.max())} "
                                  f">= the model's vocabulary size {vocab_size} (tokenizer and model do not match)")


class MetricsSink:
    """metrics.jsonl (always) and TensorBoard (report_to) — one record per logging step.

    `history` holds every record written so far; checkpoints store it, and a resumed run starts by rewriting
    metrics.jsonl from the checkpoint's history, so the file has no step twice and none missing whatever was appended
    between that checkpoint and the kill."""

    def __init__(self, output_dir: Path, tensorboard: bool, enabled: bool, history: Optional[list] = None,
                 resume_step: Optional[int] = None, wandb_init: Optional[dict] = None):
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self.history = list(history or [])
        self.tb = self.wandb = None
        if enabled and wandb_init is not None:
            import wandb

            self.wandb = wandb.init(**wandb_init)
        if enabled:
            C.atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.history))
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides the events a killed run logged after the checkpoint it is resumed from.
            purge = None if resume_step is None else resume_step + 1
            self.tb = SummaryWriter(str(output_dir / "tensorboard"), purge_step=purge)

    def write(self, step: int, metrics: dict) -> None:
        # 8 significant digits (not decimal places: a DPO learning rate of 5e-7 in warmup would lose its digits).
        record = {"step": step, **{k: (float(f"{v:.8g}") if isinstance(v, float) else v) for k, v in metrics.items()}}
        self.history.append(record)
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            # transformers' names on W&B, so TRL's dashboards read these runs: train/loss, eval/loss, ...
            self.wandb.log({k if k.startswith("eval/") else f"train/{k}": v for k, v in metrics.items()
                            if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class DisplacementWatch:
    """Likelihood displacement: the chosen completions' log-prob falling log after log while the margin keeps rising.

    DPO only widens the gap between chosen and rejected; it can do so by pushing both down, and a falling chosen
    likelihood is the usual first sign of degenerate generations (arXiv 2410.08847). The watch reads the logged
    `logps/chosen` and `rewards/margins` and speaks once per episode: after `window` consecutive logs in which the chosen
    log-prob fell while the margin ended higher than it started.
    """

    def __init__(self, window: int = 5):
        self.window = window
        self.history: list[tuple[float, float]] = []
        self.active = False

    def update(self, metrics: dict) -> Optional[str]:
        if "logps/chosen" not in metrics or "rewards/margins" not in metrics:
            return None
        self.history.append((metrics["logps/chosen"], metrics["rewards/margins"]))
        recent = self.history[-(self.window + 1):]
        falling = len(recent) == self.window + 1 and all(b[0] < a[0] for a, b in zip(recent, recent[1:]))
        triggered = falling and recent[-1][1] > recent[0][1]
        fire, self.active = triggered and not self.active, triggered
        if not fire:
            return None
        return (f"chosen log-probs fell for {self.window} logs in a row ({recent[0][0]:.3f} -> {recent[-1][0]:.3f}) "
                f"while margins rose ({recent[0][1]:.3f} -> {recent[-1][1]:.3f}): likelihood displacement; consider "
                "rpo_alpha > 0, a lower learning_rate or a higher beta")


class MeanMeter:
    """Weighted running means of named metrics, reset at each log."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}

    def add(self, metrics: dict, weight: float = 1.0) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * weight
            self.weights[k] = self.weights.get(k, 0.0) + weight

    def means(self) -> dict:
        return {k: self.sums[k] / self.weights[k] for k in self.sums if self.weights[k] > 0}

    def state(self) -> dict:
        return {"sums": dict(self.sums), "weights": dict(self.weights)}

    @classmethod
    def from_state(cls, state: dict) -> "MeanMeter":
        meter = cls()
        meter.sums, meter.weights = dict(state["sums"]), dict(state["weights"])
        return meter


# --------------------------------------------------------------------------------------------------------------------
# The shared loop


class Trainer:
    """Subclasses define `config_class`, `prepare_data(source, name)`, `collate(examples)` and
    `loss_and_metrics(batch) -> (loss_sum, weight, metrics)`, where the step's loss is loss_sum / total weight over
    the micro-batches of one optimizer step (so gradient accumulation equals one big batch exactly)."""

    config_class: type = TrainConfig

    def __init__(self, model, args=None, train_dataset=None, eval_dataset=None, processing_class=None,
                 peft_config=None):
        self.args = cfg = config_from_args(self.config_class, args)
        if model is None:
            model = cfg.model_name_or_path
        if model is None:
            raise ConfigError("no model: pass a model or set model_name_or_path")
        if isinstance(model, (str, os.PathLike)):
            # The run records the model it starts from (the default reference of `dpokit eval`), by absolute path.
            model = str(Path(model).expanduser().resolve()) if Path(model).expanduser().exists() else str(model)
            cfg.model_name_or_path = model
        self.output_dir = Path(cfg.output_dir)
        _check_writable(self.output_dir)  # before anything slow: a run that cannot save should not start
        if cfg.resume_from_checkpoint is not None:
            C.resolve(cfg.resume_from_checkpoint, self.output_dir)  # a mistyped path fails now, not after loading
        self.ref_cache_keys: dict[str, str] = {}  # split -> key of the precomputed reference log-probs
        _QUIET["quiet"] = cfg.log_level in ("error", "critical")
        set_seed(cfg.seed, cfg.full_determinism)
        if cfg.fp16 and not torch.cuda.is_available():
            raise ConfigError("fp16 needs a CUDA GPU; on CPU use bf16 or neither")
        if cfg.tf32 is not None:
            if cfg.tf32 and not torch.cuda.is_available():
                raise ConfigError("tf32 needs an Ampere or newer NVIDIA GPU; on CPU leave it unset")
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
        self.accelerator = dist.make_accelerator("bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "no", cfg)
        self.engine = dist.engine_name(self.accelerator)
        if self.engine == "deepspeed":
            self._check_deepspeed_config()
        if getattr(cfg, "inert_keys", None):
            log(f"TRL keys accepted that change nothing in dpokit: {', '.join(sorted(cfg.inert_keys))}")
        self.tokenizer = load_tokenizer(processing_class, model, cfg)
        # Data before the model: a bad row should fail in seconds, not after loading billions of weights.
        train_source, eval_source = self._sources(train_dataset, eval_dataset)
        self.train_examples = self.prepare_data(train_source, "train") if train_source is not None else None
        self.eval_examples = self.prepare_data(eval_source, "eval") if eval_source is not None else None
        self.model = load_model(model, cfg)
        vocab = self.model.get_input_embeddings().num_embeddings
        for split, examples in (("train", self.train_examples), ("eval", self.eval_examples)):
            if examples is not None:
                check_vocab(examples, vocab, self.data_reports[split].where)
        if cfg.disable_dropout:
            disable_dropout(self.model)
        self.use_peft = cfg.use_peft or peft_config is not None
        self.setup_reference_before_peft()
        if self.use_peft:
            self.model = apply_lora(self.model, cfg, peft_config)
        if cfg.gradient_checkpointing:
            enable_checkpointing(self.model, cfg.gradient_checkpointing_kwargs)
            if hasattr(self.model, "enable_input_require_grads"):
                self.model.enable_input_require_grads()  # so checkpointed blocks see a grad path under LoRA
        self.model.train()
        if cfg.padding_free:
            # Packed rows need attention kept inside each sequence: transformers' own sdpa would let packed
            # sequences attend to each other (position ids alone do not isolate them).
            enable_packed_attention(self.model)
        self.setup_reference()
        if cfg.torch_compile:
            compile_layers(self.model, cfg)
            if getattr(self, "_ref_module", None) is not None:
                compile_layers(self._ref_module, cfg)

        self.model = self.model.to(self.accelerator.device)
        # Every policy forward goes through this module; `train` has the engine wrap it (DDP, FSDP), so the engine's
        # hooks run although dpokit.logps calls the decoder and LM head directly. `self.model` stays the plain model.
        self.policy: nn.Module = dist.PolicyCall(self.model)
        self.global_step = 0
        self.optimizer = self.scheduler = None

    def _sources(self, train_dataset, eval_dataset) -> tuple:
        """The training and evaluation sources: the objects passed in, else `train_file` / `eval_file`, else TRL's
        `dataset_name` (its test split evaluated only when `eval_strategy` asks for evaluation, as TRL's scripts do).
        An `eval_strategy` that asks for evaluation without evaluation data is refused, as in TRL."""
        cfg = self.args
        train = train_dataset if train_dataset is not None else cfg.train_file
        evaluation = eval_dataset if eval_dataset is not None else cfg.eval_file
        if train is None and cfg.dataset_name:
            train = cfg.dataset_name
        if evaluation is None and cfg.dataset_name and cfg.eval_strategy in ("steps", "epoch"):
            if Path(cfg.dataset_name).is_file():
                # One file is one split: its "test split" would be the training rows themselves.
                raise ConfigError(f"eval_strategy is {cfg.eval_strategy!r} but dataset_name {cfg.dataset_name!r} is "
                                  "a single file (one split, the training data); set eval_file for evaluation")
            evaluation = cfg.dataset_name
        if cfg.eval_strategy in ("steps", "epoch") and evaluation is None:
            raise ConfigError(f"eval_strategy is {cfg.eval_strategy!r} but there is no evaluation data: set eval_file "
                              "(or pass eval_dataset=), or set eval_strategy: no")
        if cfg.eval_strategy == "no":
            evaluation = None
        return train, evaluation

    def _load_rows(self, source, split: str):
        """Rows of a data source; a source with splits gives `dataset_train_split` or `dataset_test_split`."""
        cfg = self.args
        return D.load_rows(source, split=cfg.dataset_train_split if split == "train" else cfg.dataset_test_split,
                           config_name=cfg.dataset_config)

    def _check_deepspeed_config(self) -> None:
        """What dpokit cannot do under DeepSpeed, refused before any work: DeepSpeed clips and applies the update
        inside its engine (in the step's last backward), so an update cannot be skipped. (Checkpoints work: their
        full, name-keyed optimizer state is gathered from and scattered into DeepSpeed's partitions.)"""
        cfg = self.args
        if cfg.on_nonfinite == "skip":
            raise ConfigError("on_nonfinite=skip is not supported under DeepSpeed (its engine applies the update "
                              "inside backward, so an update cannot be skipped); use on_nonfinite=stop, or FSDP/DDP")

    # ----- hooks for subclasses -----
    def setup_reference_before_peft(self) -> None:
        pass

    def setup_reference(self) -> None:
        pass

    def prepare_data(self, source, split: str):
        raise NotImplementedError

    def collate(self, examples):
        raise NotImplementedError

    def loss_and_metrics(self, batch: dict, train: bool):
        raise NotImplementedError

    # ----- pieces of the loop -----
    def autocast(self):
        if self.engine == "deepspeed" and self.args.bf16:
            # DeepSpeed runs the policy in bf16 itself (accelerate's autocast is then a no-op); a separate float32
            # reference model, not wrapped by the engine, still needs autocast to be computed in bf16 like it.
            return torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16)
        return self.accelerator.autocast()

    def token_budget(self) -> Optional[int]:
        """Packed tokens per micro-batch and process, or None for `per_device_train_batch_size` examples each."""
        return None

    def pack(self, examples: list, budget: int) -> list[list]:
        """`examples` split into micro-batches of at most `budget` tokens (trainers with a `token_budget`)."""
        raise NotImplementedError

    def pack_cost(self, example) -> int:
        """The tokens `example` takes in a packed micro-batch."""
        raise NotImplementedError

    def _check_token_budget(self) -> None:
        """Refuse, before any work, a budget the longest training example cannot fit in."""
        budget = self.token_budget()
        if budget:
            self.pack([max(self.train_examples, key=self.pack_cost)], budget)  # raises ConfigError naming the row

    def _global_micro_batch_size(self) -> int:
        """Examples per global data group: one micro-step over all processes, or with a token budget one whole
        optimizer step (packed into micro-batches afterwards). N processes equal one process with N times the batch."""
        cfg = self.args
        size = cfg.per_device_train_batch_size * self.accelerator.num_processes
        return size * cfg.gradient_accumulation_steps if self.token_budget() else size

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """The example indices of each *global* micro-batch of `epoch` (all ranks together). A fresh generator per
        epoch, seeded by (seed, epoch), and nothing else: the data order is a pure function of the config and the
        global micro-batch size, so resuming at (epoch, micro-batch) needs no sampler state beyond those two numbers,
        draws nothing from the global RNGs that dropout uses, and is the same on every rank."""
        cfg = self.args
        order = data_order(len(self.train_examples), cfg.seed if cfg.data_seed is None else cfg.data_seed, epoch)
        size = self._global_micro_batch_size()
        return [order[i:i + size] for i in range(0, len(order), size)]

    def _eval_loader(self) -> DataLoader:
        # Its own generator: a DataLoader draws a seed when iterated, which must not come from the global RNG that
        # dropout uses (evaluating would shift the training randomness, and eval_steps may change on resume).
        return DataLoader(self._rank_slice(self.eval_examples), batch_size=self.args.per_device_eval_batch_size,
                          shuffle=False, collate_fn=self.collate, generator=torch.Generator())

    def _rank_slice(self, examples: list) -> list:
        """This rank's contiguous share of `examples` (evaluation, reference precomputation): sizes differ by at
        most one, and rank order is dataset order."""
        acc = self.accelerator
        n, world, rank = len(examples), acc.num_processes, acc.process_index
        return examples[rank * n // world:(rank + 1) * n // world]

    def _steps(self, epoch: int = 0, start: int = 0):
        """Endless (epoch, next position in epoch, micro) stream of this rank's optimizer steps, from data group
        `start` of `epoch`; `micro` holds (batch, is_filler) pairs, the same number on every rank."""
        cfg = self.args
        if not self.token_budget():
            stream, groups = self._micro_batches(epoch, start), self._groups_per_epoch()
            while True:
                micro = []
                for _ in range(cfg.gradient_accumulation_steps):
                    epoch, index, batch, filler = next(stream)
                    micro.append((batch, filler))
                    if index + 1 >= groups:
                        # An epoch's last step takes what is left of it, as transformers' Trainer does (and as a
                        # token budget, which packs whole steps, does): a step never mixes two epochs' shuffles.
                        break
                yield epoch, index + 1, micro
        while True:
            batches = self._epoch_batches(epoch)
            for i in range(start, len(batches)):
                yield epoch, i + 1, self._budget_micro_batches(batches[i])
            epoch, start = epoch + 1, 0

    def _budget_micro_batches(self, indices: list[int]) -> list:
        """One optimizer step's examples (`indices`, all ranks) as this rank's token-budget micro-batches.

        The examples are split over the ranks by token count (`rank_part`: equal counts, balanced tokens), then each
        rank's share is packed into micro-batches of at most `token_budget` tokens. Every rank computes every rank's
        packing (a pure function of the step's examples, no collective), so all know the step's number of passes:
        the most any rank needs. A rank with fewer runs zero-weight filler passes, since every rank must run the
        same passes for the engine's collectives to pair up; balanced shares keep those rare."""
        acc, budget = self.accelerator, self.token_budget()
        sizes = [_example_tokens(self.train_examples[j]) for j in indices]
        packed = []
        for rank in range(acc.num_processes):
            part = dist.rank_part(indices, sizes, rank, acc.num_processes)
            packed.append(self.pack([self.train_examples[j] for j in part], budget) if part else [])
        mine, passes = packed[acc.process_index], max(len(p) for p in packed)
        micro = [(self.collate(group), False) for group in mine]
        filler = self.collate([self.train_examples[indices[0]]])
        return micro + [(filler, True)] * (passes - len(micro))

    def _micro_batches(self, epoch: int = 0, start: int = 0):
        """Endless (epoch, index in epoch, batch, is_filler) stream of this rank's part of each global micro-batch,
        from micro-batch `start` of `epoch`. A rank whose part is empty (the last micro-batch of an epoch can be
        smaller than the number of processes) gets a filler: a real example to run with zero weight, because every
        rank must run the same passes for the engine's collectives to pair up."""
        acc = self.accelerator
        while True:
            batches = self._epoch_batches(epoch)
            for i in range(start, len(batches)):
                indices = batches[i]
                sizes = [_example_tokens(self.train_examples[j]) for j in indices]
                part = dist.rank_part(indices, sizes, acc.process_index, acc.num_processes)
                filler = not part
                yield epoch, i, self.collate([self.train_examples[j] for j in (part or indices[:1])]), filler
            epoch, start = epoch + 1, 0

    def _groups_per_epoch(self) -> int:
        """Global data groups (see `_global_micro_batch_size`) in one pass over the training examples."""
        return math.ceil(len(self.train_examples) / self._global_micro_batch_size())

    def _steps_per_epoch(self) -> int:
        groups = self._groups_per_epoch()
        return groups if self.token_budget() else math.ceil(groups / self.args.gradient_accumulation_steps)

    def _total_steps(self) -> int:
        cfg = self.args
        return cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.num_train_epochs * self._steps_per_epoch()))

    def _make_optimizer(self, total_steps: int) -> None:
        from transformers import get_scheduler

        cfg = self.args
        params = dict(self.model.named_parameters())
        decay, no_decay = ([params[n] for n in names] for names in self._group_names(prefix=""))
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if self.engine == "deepspeed":
            # ZeRO-3 drops empty parameter groups from the optimizer (e.g. LoRA has no 1-D parameters), and the
            # schedule must see the groups DeepSpeed keeps.
            groups = [g for g in groups if g["params"]]
        # The same update either way; the fused kernel only where torch has it for the device (CUDA).
        fused = cfg.optim == "adamw_torch_fused" and self.accelerator.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                           eps=cfg.adam_epsilon, fused=fused)
        warmup = (steps_from(cfg.warmup_steps, total_steps) if cfg.warmup_steps > 0
                  else math.ceil(cfg.warmup_ratio * total_steps))
        try:
            self.scheduler = get_scheduler(cfg.lr_scheduler_type, self.optimizer, num_warmup_steps=warmup,
                                           num_training_steps=total_steps,
                                           scheduler_specific_kwargs=cfg.lr_scheduler_kwargs or None)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"lr_scheduler_kwargs {cfg.lr_scheduler_kwargs} for {cfg.lr_scheduler_type!r}: "
                              f"{str(exc).splitlines()[0]}") from None

    def _group_names(self, prefix: str = "model.") -> list[list[str]]:
        """The names of the trained parameters in each of the optimizer's groups (weight decay, none), empty ones
        included; with `prefix`, as the optimizer state's keys name them (PolicyCall's attribute)."""
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                # ZeRO-3 leaves each parameter a flat partition; its shape is then `ds_shape`.
                ndim = len(getattr(p, "ds_shape", p.shape))
                (no_decay if ndim < 2 or "norm" in name.lower() else decay).append(prefix + name)
        return [decay, no_decay]

    def _check_output_dir(self, resume: Optional[str]) -> Optional[Path]:
        """Refuse to write into another run; on resume, find the checkpoint (None: there is nothing to resume yet)."""
        cfg = self.args
        marker = self.output_dir / RUN_MARKER
        if resume is not None:
            if cfg.overwrite_output_dir:
                raise ConfigError("resume_from_checkpoint and overwrite_output_dir are both set; choose one")
            ckpt = C.resolve(str(resume), self.output_dir)
            if ckpt is None:
                # A job script that passes --resume on every restart: its first start, or a kill before the first
                # checkpoint, has nothing to resume, and starting over *is* then the exact resume — of the same run.
                if marker.exists():
                    self._check_same_run(yaml.safe_load(marker.read_text()) or {}, f"the run in {self.output_dir}")
                log(f"resume_from_checkpoint=latest: no checkpoint in {self.output_dir} yet; starting at step 0")
            return ckpt
        if marker.exists() and not cfg.overwrite_output_dir:
            raise ConfigError(f"output_dir {str(self.output_dir)!r} already holds a run; resume it with "
                              "resume_from_checkpoint=latest (--resume), set overwrite_output_dir=true, "
                              "or choose another output_dir")
        if cfg.overwrite_output_dir and self.accelerator.is_main_process:
            # Left in place, the old run's checkpoints and `latest` would be taken for this run's by a later resume.
            old = C.list_checkpoints(self.output_dir)
            for _, path in old:
                shutil.rmtree(path)
            (self.output_dir / C.LATEST).unlink(missing_ok=True)
            files = C.remove_run_outputs(self.output_dir)
            if old or files:
                log(f"overwrite_output_dir: removed {len(old)} checkpoint(s) and {len(files)} file(s) of the previous "
                    "run (model, tokenizer, logs)")
        return None

    def _rank_rng(self, tensors: dict) -> dict:
        """This rank's saved RNG state. On another number of processes there is no such thing: every rank takes
        rank 0's (only dropout draws from these generators, and its masks then differ from the original run's)."""
        ranks = [tensors["rng"], *tensors["rng"].get("other_ranks", [])]
        acc = self.accelerator
        return ranks[acc.process_index] if len(ranks) == acc.num_processes else ranks[0]

    def _check_same_run(self, saved_config: dict, what: str, global_micro_batch: Optional[int] = None) -> None:
        """Refuse a config that would make another run. With `global_micro_batch` (a checkpoint's), the per-device
        batch may differ as long as per-device batch x processes is the same: the data order and every step's
        global batch are then the same, so the run resumes on another number of processes."""
        may_change = set(RESUME_MAY_CHANGE)
        if global_micro_batch is not None:
            here = self._global_micro_batch_size()
            if global_micro_batch != here:
                cfg, n = self.args, self.accelerator.num_processes
                raise C.CheckpointError(
                    f"cannot resume {what}: it was written with {global_micro_batch} examples per data group (a micro-step "
                    f"over all processes; with token_budget, an optimizer step), this run has {here} (per_device_train_batch_size={cfg.per_device_train_batch_size} x "
                    f"{n} process(es)); set per_device_train_batch_size to {global_micro_batch}/{n} or launch "
                    f"{global_micro_batch}/{cfg.per_device_train_batch_size} processes")
            may_change.add("per_device_train_batch_size")
        # A key the checkpoint lacks was added to dpokit after it was written: it had that key's default meaning.
        saved_config = {**type(self.args)().to_dict(), **saved_config}
        diffs = C.config_differences(saved_config, self.args.to_dict(), may_change)
        if diffs:
            raise C.CheckpointError(f"cannot resume {what}: the config differs in {', '.join(diffs)}; resume with "
                                    "the run's settings, or start a new run in another output_dir")

    def _train_fingerprint(self) -> str:
        if getattr(self, "_train_fp", None) is None:
            self._train_fp = C.examples_fingerprint(self.train_examples)
        return self._train_fp

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.accelerator.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    # ----- the loop -----
    def train(self, resume_from_checkpoint: Optional[str | bool] = None):
        """Run the optimisation; returns transformers' `TrainOutput`: global_step, training_loss (the mean loss of
        the steps run) and metrics (the last logged training metrics, train_runtime, train_loss).
        `resume_from_checkpoint` (else the config field): `latest` (or True) or a checkpoint directory, to continue
        a stopped run exactly."""
        cfg, acc = self.args, self.accelerator
        if self.train_examples is None:
            raise ConfigError("no training data: pass train_dataset= or set train_file")
        resume = cfg.resume_from_checkpoint if resume_from_checkpoint is None else resume_from_checkpoint
        resume = C.LATEST if resume is True else None if resume is False else resume
        self._check_token_budget()
        ckpt = self._check_output_dir(resume)
        saved = C.load_state(ckpt) if ckpt is not None else None
        # Every rank has checked the output directory before the first process writes into it.
        acc.wait_for_everyone()
        if acc.is_main_process:
            try:
                self.output_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"cannot create output_dir {str(self.output_dir)!r}: {exc.strerror}") from None
            removed = C.remove_partial_saves(self.output_dir)
            if removed:
                log(f"removed {len(removed)} partial save(s) of an interrupted run: {', '.join(removed)}")
            cfg.save(self.output_dir / RUN_MARKER)
            self._write_data_report()
        total_steps = self._total_steps()
        self._make_optimizer(total_steps)
        if self.engine == "deepspeed":
            dist.configure_deepspeed(acc, micro_batch_size=cfg.per_device_train_batch_size,
                                     gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                                     max_grad_norm=cfg.max_grad_norm)
        self.policy, self.optimizer = acc.prepare(self.policy, self.optimizer)
        if acc.num_processes > 1:
            log(f"{acc.num_processes} processes on {acc.device.type}, engine {self.engine} "
                f"({type(self.policy).__name__})")
        if isinstance(getattr(self, "reference", None), AdapterOffReference):
            self.reference.call = self.policy  # the adapter-off pass needs the engine's hooks too (FSDP gathers)
        self.global_step, self.nonfinite_steps = 0, 0
        self._position = (0, 0)  # (epoch, index of the next micro-batch in it)
        self._meter = MeanMeter()  # metrics of the steps since the last log
        if saved is not None:
            self._restore(ckpt, *saved, total_steps)
            if acc.is_main_process:
                C.write_latest(self.output_dir, ckpt)  # resuming an older checkpoint makes it the newest again
        wandb_init = None
        if cfg.report_to_wandb:
            # As transformers' WandbCallback starts a run; a resumed run is a new W&B run going on from its step.
            wandb_init = dict(project=os.environ.get("WANDB_PROJECT", "huggingface"), name=cfg.run_name,
                              config=cfg.to_dict())
        self._sink = sink = MetricsSink(self.output_dir, cfg.report_to_tensorboard, acc.is_main_process,
                                        history=saved[1]["metrics"] if saved else None,
                                        resume_step=self.global_step if saved else None, wandb_init=wandb_init)
        last: dict = {}
        self._current: dict = {}
        loss_sum, loss_steps, started = 0.0, 0, time.perf_counter()
        self._displacement = DisplacementWatch()
        stream = self._steps(*self._position)
        bar = None
        if not cfg.disable_tqdm and acc.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=total_steps, initial=self.global_step, desc=type(self).__name__, dynamic_ncols=True)
        log_every, eval_every, save_every = self._intervals(total_steps)
        groups = self._groups_per_epoch()
        epochs_done = self._position[0] + (self._position[1] >= groups)
        if cfg.eval_on_start and self.eval_examples is not None and saved is None:
            sink.write(0, self._evaluate())
        self.policy.train()
        if saved is not None:
            # Last, so that nothing between here and the first step draws from the restored generators.
            C.restore_rng(self._rank_rng(saved[0]))
        try:
            while self.global_step < total_steps:
                t0 = time.perf_counter()
                epoch, position, micro = next(stream)
                self._position = (epoch, position)
                record, tokens = self._optimizer_step([(self._to_device(b), filler) for b, filler in micro])
                self.global_step += 1
                # The loss and the preference metrics are logged as means over the steps since the last log; the
                # learning rate and the gradient norm as the last step's values, as transformers logs them.
                self._current = {"learning_rate": self.scheduler.get_last_lr()[0],
                                 **({"grad_norm": record.pop("grad_norm")} if "grad_norm" in record else {})}
                record["tokens_per_second"] = tokens / max(time.perf_counter() - t0, 1e-9)
                self._meter.add(record)
                if "loss" in record:
                    loss_sum, loss_steps = loss_sum + record["loss"], loss_steps + 1
                if bar is not None:
                    bar.update(1)
                    if "loss" in record:
                        bar.set_postfix(loss=f"{record['loss']:.4f}")
                # A step can end an epoch (its last data group) or, with accumulation, run across the boundary.
                done = epoch + (position >= groups)
                epoch_end, epochs_done = done > epochs_done, done
                step, last_step = self.global_step, self.global_step == total_steps
                if last_step or (step == 1 and cfg.logging_first_step) or _due(cfg.logging_strategy, log_every, step,
                                                                                 epoch_end):
                    last = self._log_training_metrics(epoch)
                if self.eval_examples is not None and not last_step and _due(self._eval_strategy(), eval_every,
                                                                              step, epoch_end):
                    sink.write(self.global_step, self._evaluate())
                if not last_step and _due(cfg.save_strategy, save_every, step, epoch_end):
                    self._save_checkpoint()
            if self.eval_examples is not None:
                sink.write(self.global_step, self._evaluate())
        finally:
            if bar is not None:
                bar.close()
            sink.close()
        from transformers.trainer_utils import TrainOutput

        training_loss = loss_sum / loss_steps if loss_steps else float("nan")
        return TrainOutput(self.global_step, training_loss, {
            **last, "train_runtime": time.perf_counter() - started, "train_loss": training_loss})

    def _log_training_metrics(self, epoch: int) -> dict:
        """Write the mean metrics of the steps since the last log; warn (once per episode) about likelihood
        displacement, in the log and in warnings.jsonl, so `dpokit report` shows it too."""
        record = {**self._meter.means(), **self._current, "epoch": epoch}
        if self.args.on_nonfinite == "skip":
            record["nonfinite_steps"] = self.nonfinite_steps
        self._sink.write(self.global_step, record)
        self._meter = MeanMeter()
        warning = self._displacement.update(record) if self.accelerator.is_main_process else None
        if warning:
            log(f"warning at step {self.global_step}: {warning}")
            with (self.output_dir / "warnings.jsonl").open("a") as f:
                f.write(json.dumps({"step": self.global_step, "kind": "likelihood_displacement",
                                    "message": warning}) + "\n")
        return record

    @property
    def state(self):
        """The run as transformers' `TrainerState` (global_step, max_steps, epoch, log_history: every record written
        to metrics.jsonl), for code written against TRL's and transformers' trainers (`trainer.state.log_history`)."""
        from transformers import TrainerState

        data = self.train_examples is not None
        total, per_epoch = (self._total_steps(), self._steps_per_epoch()) if data else (0, 0)
        sink = getattr(self, "_sink", None)
        return TrainerState(global_step=self.global_step, max_steps=total,
                            epoch=self.global_step / per_epoch if per_epoch else 0.0,
                            log_history=[_transformers_names(r) for r in sink.history] if sink is not None else [],
                            logging_steps=self.args.logging_steps, save_steps=self.args.save_steps,
                            eval_steps=self.args.eval_steps, train_batch_size=self.args.per_device_train_batch_size)

    def log_metrics(self, split: str, metrics: dict) -> None:
        """Print `metrics` as transformers' `Trainer.log_metrics` does (main process only)."""
        if not self.accelerator.is_main_process:
            return
        print(f"***** {split} metrics *****")
        width = max((len(k) for k in metrics), default=0)
        for key in sorted(metrics):
            print(f"  {key:<{width}} = {metrics[key]}")

    def save_metrics(self, split: str, metrics: dict, combined: bool = True) -> None:
        """Write `metrics` to output_dir/{split}_results.json and, with `combined`, merge them into all_results.json
        (transformers' `Trainer.save_metrics`; main process only)."""
        if not self.accelerator.is_main_process:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / f"{split}_results.json").write_text(json.dumps(metrics, indent=4, sort_keys=True))
        if combined:
            path = self.output_dir / "all_results.json"
            merged = {**(json.loads(path.read_text()) if path.is_file() else {}), **metrics}
            path.write_text(json.dumps(merged, indent=4, sort_keys=True))

    def save_state(self) -> None:
        """Write `state` to output_dir/trainer_state.json (transformers' `Trainer.save_state`; main process only)."""
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.state.save_to_json(str(self.output_dir / "trainer_state.json"))

    def _eval_strategy(self) -> str:
        """`eval_strategy`, with dpokit's default (null) read as steps when `eval_steps` is set, else end only."""
        cfg = self.args
        if cfg.eval_strategy is None:
            return "steps" if cfg.eval_steps else "no"
        return cfg.eval_strategy

    def _intervals(self, total_steps: int) -> tuple[int, Optional[int], int]:
        """Logging, evaluation and save intervals in optimizer steps (fractions of the run resolved; evaluation
        every `logging_steps` when `eval_strategy: steps` names no `eval_steps`, as in transformers)."""
        cfg = self.args
        log_every = steps_from(cfg.logging_steps, total_steps)
        eval_every = steps_from(cfg.eval_steps, total_steps) or log_every
        return log_every, eval_every, steps_from(cfg.save_steps, total_steps)

    def batch_weight(self, batch: dict) -> float:
        raise NotImplementedError

    def _write_data_report(self) -> None:
        """`data_report.json`: per split, the counts printed at load time (rows read, kept, skipped, deduplicated,
        truncated, dropped), so what happened to the data is on record beside the model, not only in a terminal."""
        fields = ("source", "format", "read", "kept", "skipped", "deduplicated", "truncated_prompt",
                  "truncated_completion", "dropped", "identical_after_truncation", "unpaired")
        reports = {split: {f: getattr(r, f) for f in fields if hasattr(r, f)}
                   for split, r in getattr(self, "data_reports", {}).items()}
        (self.output_dir / "data_report.json").write_text(json.dumps(reports, indent=2) + "\n")
        # Written here, once the output_dir is known to be this run's, not at load time: a run refused for
        # writing into another run's directory must not have replaced that run's list.
        skipped = [{"split": split, "source": self.data_sources[split], **item}
                   for split, r in getattr(self, "data_reports", {}).items() for item in r.skipped_rows]
        if skipped:
            with (self.output_dir / "skipped_rows.jsonl").open("w") as f:
                f.writelines(json.dumps(item) + "\n" for item in skipped)

    def _optimizer_step(self, micro: list) -> tuple[dict, int]:
        """Forward and backward over this rank's micro-batches of one optimizer step (`(batch, is_filler)` pairs),
        then the update — unless a loss or the gradient is non-finite on any rank (checked before the update), which
        stops the run or skips the update per `on_nonfinite`. Returns the step's mean metrics over all ranks (none
        when skipped) and its token count over all ranks.

        The step's loss is sum over the global batch / global weight. DDP, FSDP and DeepSpeed average gradients over
        ranks, so each rank backpropagates local_sum * num_processes / global_weight; fillers count with weight zero.

        Under DeepSpeed the engine clips and applies the update inside the backward of the step's last micro-batch
        (accelerate's sync flag, set here per micro-batch, marks it): a non-finite loss is still caught before any
        backward, but the gradient norm can only be read after the update (a non-finite one stops the run)."""
        acc = self.accelerator
        world = acc.num_processes
        deepspeed = self.engine == "deepspeed"
        local_weight = float(sum(self.batch_weight(b) for b, filler in micro if not filler))
        total_weight = dist.all_reduce_sum(acc, [local_weight])[0]
        step_metrics, tokens, problem, grad_norm = MeanMeter(), 0, None, float("nan")
        with self._out_of_memory_hint("train"):
            for i, (batch, filler) in enumerate(micro):
                sync = i == len(micro) - 1
                ctx = contextlib.nullcontext() if sync else acc.no_sync(self.policy)
                with ctx:
                    with self.autocast():
                        loss_sum, weight, metrics = self.loss_and_metrics(batch, train=True)
                    bad = not filler and not bool(torch.isfinite(loss_sum.detach()).all())
                    # All ranks must agree, or one would stop while the others wait in the gradient all-reduce.
                    if world > 1 and dist.all_reduce_sum(acc, [float(bad)])[0] > 0:
                        bad_rows = dist.gather_objects(acc, batch["row"].tolist() if bad else [])
                        problem = (f"loss ({float(loss_sum.detach().float().sum())})" if bad else "loss (on another "
                                   "process)", [{"row": torch.tensor(sum(bad_rows, []))}])
                        if sync and not deepspeed:
                            # DDP expects this synchronised forward's backward; run it with no effect on the update.
                            acc.backward(loss_sum * 0.0)
                        break
                    if bad:
                        # The first bad micro-batch is the one to name; the rest of the step is never run.
                        problem = (f"loss ({float(loss_sum.detach().float().sum())})", [batch])
                        break
                    scale = 0.0 if filler else world / total_weight
                    if deepspeed:
                        # The last micro-batch's backward runs DeepSpeed's step: clip, update, zero the gradients.
                        # dpokit scales the loss itself (global weight), so DeepSpeed must not divide it again.
                        acc.gradient_state._set_sync_gradients(sync)
                        try:
                            acc.backward(loss_sum * scale, scale_wrt_gas=False)
                        finally:
                            acc.gradient_state._set_sync_gradients(True)
                    else:
                        acc.backward(loss_sum * scale)
                if not filler:
                    step_metrics.add(metrics, weight)
                    # Non-padding tokens the step covered (a shared prompt counts for chosen and rejected, as TRL sees it).
                    tokens += int(batch.get("logical_tokens", batch["attention_mask"].sum()))
            if problem is None and deepspeed:
                grad_norm = dist.deepspeed_grad_norm(self.policy)
                if not math.isfinite(grad_norm):
                    self._nonfinite_after_update(grad_norm, [b for b, filler in micro if not filler])
            elif problem is None:
                grad_norm, problem = self._clip_and_check([b for b, filler in micro if not filler])
            if problem is None:
                self.optimizer.step()
        if problem is not None:
            self._nonfinite(*problem)  # raises, unless on_nonfinite=skip allows one more skipped step
        with warnings.catch_warnings():
            # A skipped step still advances the schedule (so it stays aligned with max_steps); torch warns when a
            # scheduler steps before the optimizer ever has, which is just what skipping the first step does.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        sums, weights = dist.reduce_meter(acc, step_metrics.sums, step_metrics.weights)
        step_metrics.sums, step_metrics.weights = sums, weights
        tokens = int(dist.all_reduce_sum(acc, [tokens])[0])
        record = {} if problem is not None else {**step_metrics.means(), "grad_norm": grad_norm}
        return record, tokens

    def _clip_and_check(self, micro: list) -> tuple[float, Optional[tuple]]:
        """Clip the gradient norm; returns it and, when it is non-finite, the problem to report (never trained on)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            norm = self.accelerator.clip_grad_norm_(params, self.args.max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        norm = float(norm)
        if math.isfinite(norm) or self.accelerator.scaler is not None:
            # Under fp16 an infinite gradient is the gradient scaler's overflow signal: the scaler skips that update
            # and lowers the scale itself. (A non-finite *loss* is still caught above.)
            return norm, None
        return norm, (f"gradient norm ({norm})", micro)

    def _nonfinite_after_update(self, norm: float, batches: list) -> None:
        """DeepSpeed: the gradient was non-finite, and the engine has already applied the update."""
        rows = sorted(int(r) for b in batches for r in b["row"].tolist())
        report = getattr(self, "data_reports", {}).get("train")
        where = f": {', '.join(report.where(r) for r in rows[:8])}{', ...' if len(rows) > 8 else ''}" if report else ""
        raise NonFiniteError(f"non-finite gradient norm ({norm}) at step {self.global_step + 1} (rows {rows}{where}); "
                             "DeepSpeed applied this update inside its engine before dpokit could check it, so the "
                             "weights may now hold NaN/Inf; stopped; resume from the last checkpoint (written "
                             "before this update) or start again, e.g. with a lower learning_rate")

    def _nonfinite(self, what: str, batches: list) -> None:
        cfg = self.args
        step = self.global_step + 1
        rows = sorted(int(r) for b in batches for r in b["row"].tolist())
        report = getattr(self, "data_reports", {}).get("train")
        where = f": {', '.join(report.where(r) for r in rows[:8])}{', ...' if len(rows) > 8 else ''}" if report else ""
        if cfg.on_nonfinite == "skip" and self.nonfinite_steps < cfg.max_nonfinite_steps:
            self.nonfinite_steps += 1
            log(f"non-finite {what} at step {step} (rows {rows}{where}); no update for this step "
                f"({self.nonfinite_steps} skipped of max_nonfinite_steps={cfg.max_nonfinite_steps})")
            return
        latest = C.read_latest(self.output_dir)
        kept = f"last good checkpoint: {latest}" if latest else "no checkpoint had been written"
        why = "" if cfg.on_nonfinite == "stop" else \
            f" ({self.nonfinite_steps} steps skipped already, max_nonfinite_steps={cfg.max_nonfinite_steps})"
        raise NonFiniteError(f"non-finite {what} at step {step} (rows {rows}{where}); stopped before the optimizer "
                             f"step{why}; {kept}")

    @contextlib.contextmanager
    def _out_of_memory_hint(self, phase: str):
        """An out-of-memory error becomes a one-line DpokitError naming the settings that make a step smaller."""
        try:
            yield
        except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError too
            if not _is_out_of_memory(exc):
                raise
            cfg = self.args
            if phase == "eval":
                raise OutOfMemory(f"out of memory during evaluation (per_device_eval_batch_size="
                                  f"{cfg.per_device_eval_batch_size}, max_length={cfg.max_length}): lower "
                                  "per_device_eval_batch_size or max_length") from exc
            if self.token_budget():
                raise OutOfMemory(f"out of memory in training step {self.global_step + 1} (token_budget="
                                  f"{self.token_budget()}, max_length={cfg.max_length}, gradient_checkpointing="
                                  f"{cfg.gradient_checkpointing}): lower token_budget (the step's pairs stay the same, "
                                  "in more micro-batches), lower max_length, or set gradient_checkpointing=true") from exc
            raise OutOfMemory(f"out of memory in training step {self.global_step + 1} (per_device_train_batch_size="
                              f"{cfg.per_device_train_batch_size}, max_length={cfg.max_length}, gradient_checkpointing="
                              f"{cfg.gradient_checkpointing}): lower per_device_train_batch_size and raise "
                              "gradient_accumulation_steps to keep the effective batch, lower max_length, or set "
                              "gradient_checkpointing=true") from exc

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """The training metrics on the trainer's `eval_dataset`, named as transformers' and TRL's `evaluate()` name
        them: ``eval_loss``, ``eval_rewards/chosen``, ... (`metric_key_prefix` + "_"). metrics.jsonl and the report
        keep dpokit's names (``eval/loss``)."""
        if eval_dataset is not None:
            raise ConfigError("evaluate(eval_dataset=...): give the evaluation data to the trainer "
                              "(eval_dataset= or eval_file), so that it is checked and tokenized with the rest")
        ignored = set(ignore_keys or ())
        return {f"{metric_key_prefix}_{k[len('eval/'):]}": v for k, v in self._evaluate().items()
                if k[len("eval/"):] not in ignored}

    @torch.no_grad()
    def _evaluate(self) -> dict:
        """The training metrics on `eval_dataset`, prefixed `eval/`; each rank evaluates its share and the weighted
        sums are reduced over ranks."""
        if self.eval_examples is None:
            raise ConfigError("no eval data: pass eval_dataset= or set eval_file")
        acc = self.accelerator
        was_training = self.policy.training
        self.policy.eval()
        meter = MeanMeter()
        batches = list(self._eval_loader())
        # Every rank runs the same number of passes (FSDP gathers weights in each); extra ones weigh nothing.
        count = dist.all_reduce_max(acc, len(batches))
        filler = self.collate(self.eval_examples[:1])
        with self._out_of_memory_hint("eval"):
            for i in range(count):
                batch = self._to_device(batches[i] if i < len(batches) else filler)
                with self.autocast():
                    _, weight, metrics = self.loss_and_metrics(batch, train=False)
                if i < len(batches):
                    meter.add(metrics, weight)
        if was_training:
            self.policy.train()
        meter.sums, meter.weights = dist.reduce_meter(acc, meter.sums, meter.weights)
        return {f"eval/{k}": v for k, v in meter.means().items()}

    # ----- saving and resuming -----
    def _unwrapped(self) -> nn.Module:
        return self.model

    def _gathered_state(self) -> Optional[dict]:
        """Under FSDP and DeepSpeed, the full state dict (a collective: every rank must call it; rank 0 receives the
        tensors; ZeRO-3 gathers its shards); elsewhere None: every rank holds the full model and `save_pretrained`
        reads it directly."""
        if self.engine not in ("fsdp", "deepspeed"):
            return None
        state = self.accelerator.get_state_dict(self.policy)
        if self.engine == "deepspeed" and self.args.bf16:
            state = dist.deepspeed_fp32_weights(self.accelerator, self.policy, state)
        if state is None:  # DeepSpeed ZeRO-3 hands the gathered weights to rank 0 only
            return None
        prefix = "model."  # PolicyCall's attribute name
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    def _write_model(self, directory: Path, state: Optional[dict] = None) -> None:
        """The model (or LoRA adapter) in Hugging Face format, the tokenizer and the run's config."""
        self._unwrapped().save_pretrained(str(directory), safe_serialization=True,
                                          **({"state_dict": state} if state is not None else {}))
        self.tokenizer.save_pretrained(str(directory))
        self.args.save(directory / RUN_MARKER)

    def save_model(self, output_dir: Optional[str] = None) -> Path:
        """The model (or LoRA adapter) in Hugging Face format plus the tokenizer, written atomically into `output_dir`:
        everything goes to a temporary directory first and is moved in only when complete."""
        out = Path(output_dir or self.args.output_dir)
        state = self._gathered_state()
        if self.accelerator.is_main_process:
            self._save_model_files(out, state)
        # No rank goes on (or exits) before the model is in place.
        self.accelerator.wait_for_everyone()
        return out

    def _save_model_files(self, out: Path, state: Optional[dict]) -> None:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".tmp-save-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        self._write_model(tmp, state)
        C.fsync_tree(tmp)
        # The final model shares output_dir with the checkpoints and metrics, so it cannot arrive by one directory
        # rename: each file is renamed into place (atomic per file), the weights last, so a kill never leaves a
        # half-written file, and a model whose weights are there is complete.
        written = {item.name for item in tmp.iterdir()}
        for item in sorted(tmp.iterdir(), key=lambda p: C.is_weights_file(p.name)):
            target = out / item.name
            if item.is_dir() and target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
        # Weights of another kind left from an earlier save (an adapter beside a full model, shards beside a single
        # file) would be loaded instead of, or mixed with, these.
        for stale in [p for p in out.iterdir() if p.is_file() and C.is_model_file(p.name) and p.name not in written]:
            stale.unlink()
        C.fsync_dir(out)
        tmp.rmdir()

    def _save_checkpoint(self) -> Path:
        """checkpoint-N: model, tokenizer and trainer state, written to a temporary directory, fsynced and renamed
        into place; then `latest` moves to it; only then are checkpoints beyond save_total_limit deleted."""
        name = f"checkpoint-{self.global_step}"
        ckpt, tmp = self.output_dir / name, self.output_dir / f".tmp-{name}"
        acc = self.accelerator
        # Each rank's RNG state (collective), so a resume on the same number of processes restores every rank's.
        rng_ranks = dist.gather_objects(acc, C.capture_rng())
        # Under FSDP and DeepSpeed the weights and the optimizer state are sharded: gathering them is a collective
        # (every rank calls it; rank 0 receives full copies, on CPU).
        state, optimizer = self._gathered_state(), self._optimizer_state()
        if acc.is_main_process:
            self._write_checkpoint(tmp, ckpt, rng_ranks, state, optimizer)
        acc.wait_for_everyone()
        return ckpt

    def _optimizer_model(self) -> nn.Module:
        """The module whose parameter names key the optimizer state: the engine's root (FSDP) or the PolicyCall."""
        return self.policy if self.engine == "fsdp" else self.accelerator.unwrap_model(self.policy)

    def _optimizer_state(self) -> dict:
        """The full optimizer state keyed by parameter name (not by position), so that a checkpoint written by one
        engine or number of processes loads into another (FSDP's sharded state is gathered; DeepSpeed's partitions
        are gathered into the same format). A collective under FSDP and DeepSpeed; under DeepSpeed only rank 0
        receives it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        if self.engine == "deepspeed":
            return dist.deepspeed_optimizer_state(self.accelerator, self.policy, self._group_names())

        return get_optimizer_state_dict(self._optimizer_model(), _inner_optimizer(self.optimizer),
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _write_checkpoint(self, tmp: Path, ckpt: Path, rng_ranks: list, state: Optional[dict],
                          optimizer: dict) -> None:
        if tmp.exists():
            shutil.rmtree(tmp)
        self._write_model(tmp, state)
        scaler = self.accelerator.scaler
        tensors = {"optimizer": optimizer, "scheduler": self._scheduler_state(),
                   "scaler": scaler.state_dict() if scaler is not None else None, "rng": dict(rng_ranks[0])}
        if len(rng_ranks) > 1:
            tensors["rng"]["other_ranks"] = rng_ranks[1:]
        info = {
            "global_step": self.global_step, "total_steps": self._total_steps(),
            # Checkpoints fall between optimizer steps, so no micro-batch of the next step has been consumed yet: the
            # micro-step within accumulation is always 0 and (epoch, next micro-batch) is the whole data position.
            "position": list(self._position), "micro_step": 0, "nonfinite_steps": self.nonfinite_steps,
            "meter": self._meter.state(), "metrics": self._sink.history,
            "data": {"train_rows": len(self.train_examples), "train_fingerprint": self._train_fingerprint()},
            "ref_cache_keys": self.ref_cache_keys, "config": C.plain(self.args.to_dict()),
            # The data position counts global micro-batches of this size; a resume needs the same size, whatever
            # the number of processes that makes it up.
            "num_processes": self.accelerator.num_processes, "global_micro_batch": self._global_micro_batch_size(),
        }
        C.save_state(tmp, tensors, info)
        C.pause_for_tests()
        C.fsync_tree(tmp)
        C.replace_dir(tmp, ckpt)
        C.write_latest(self.output_dir, ckpt)
        self._rotate_checkpoints()

    def _scheduler_state(self) -> dict:
        """The schedule's state with one entry per dpokit parameter group, empty ones included. DeepSpeed drops
        empty groups (LoRA has no 1-D parameters), so its per-group lists are widened to the other engines' layout,
        the dropped group taking the first kept group's values (the same schedule)."""
        state = self.scheduler.state_dict()
        keep = [bool(names) for names in self._group_names()]
        if self.engine != "deepspeed" or all(keep):
            return state
        for key, value in list(state.items()):
            if isinstance(value, list) and len(value) == sum(keep):
                kept = iter(value)
                state[key] = [next(kept) if k else copy.deepcopy(value[0]) for k in keep]
        return state

    def _load_scheduler_state(self, state: dict) -> None:
        """`_scheduler_state`'s inverse: under DeepSpeed, only the entries of the groups it keeps."""
        keep = [bool(names) for names in self._group_names()]
        if self.engine == "deepspeed" and not all(keep):
            state = {key: [v for v, k in zip(value, keep) if k] if isinstance(value, list) and len(value) == len(keep)
                     else value for key, value in state.items()}
        self.scheduler.load_state_dict(state)

    def _rotate_checkpoints(self) -> None:
        limit = self.args.save_total_limit
        if not limit:
            return
        # Only this run's past counts: a checkpoint-M with M > global_step is left from a continuation abandoned by
        # resuming an earlier checkpoint, and is replaced when this run reaches step M.
        done = [path for step, path in C.list_checkpoints(self.output_dir) if step <= self.global_step]
        for old in done[:-limit]:
            shutil.rmtree(old)

    def _load_sharded_weights(self, ckpt: Path) -> None:
        """FSDP: the checkpoint's full weights (every rank reads the files) scattered into this rank's shards."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        weights = self._checkpoint_weights(ckpt)
        set_model_state_dict(self.policy, {"model." + k: v for k, v in weights.items()},
                             options=StateDictOptions(full_state_dict=True, strict=False))

    def _checkpoint_weights(self, ckpt: Path) -> dict:
        """The checkpoint's weights keyed by this model's state-dict names (every trained parameter is there)."""
        files = C.read_weights(ckpt, peft=self.use_peft)
        # Names as the engine's root sees them: PolicyCall's "model." prefix; a peft adapter file drops the adapter
        # name ("lora_A.weight" for the module's "lora_A.default.weight").
        names = {}
        for name in self.model.state_dict():
            names.setdefault(name, name)
            if self.use_peft:
                names.setdefault(name.replace(".default", ""), name)
        unknown = [k for k in files if k not in names]
        trained = {names[k] for k in files if k in names}
        missing = [n for n, p in self.model.named_parameters() if p.requires_grad and n not in trained]
        if unknown or missing:
            raise C.CheckpointError(f"{ckpt} does not fit this model (unknown {unknown[:3]}, missing {missing[:3]}); "
                                    "resume with the run's own model")
        return {names[k]: v for k, v in files.items()}

    def _restore(self, ckpt: Path, tensors: dict, info: dict, total_steps: int) -> None:
        """Put weights, optimizer, scheduler, scaler, data position and counters back where `ckpt` left them, after
        checking it is this run's (the RNG states are restored by `train`, right before the first step)."""
        # Checkpoints from before multi-process support have no size: they were written by one process.
        saved_micro = info.get("global_micro_batch", info["config"].get("per_device_train_batch_size"))
        self._check_same_run(info["config"], f"from {ckpt}", global_micro_batch=saved_micro)
        if info["data"]["train_fingerprint"] != self._train_fingerprint():
            raise C.CheckpointError(f"cannot resume from {ckpt}: the training data differs from the checkpoint's "
                                    f"({info['data']['train_rows']} rows then, {len(self.train_examples)} now, or "
                                    "other token ids)")
        # Only the train split's: eval_file may change on resume.
        if info["ref_cache_keys"].get("train") != self.ref_cache_keys.get("train"):
            raise C.CheckpointError(f"cannot resume from {ckpt}: the precomputed reference log-probs differ from the "
                                    "checkpoint's (another reference model or precision)")
        if info["total_steps"] != total_steps or info["micro_step"] != 0:
            raise C.CheckpointError(f"cannot resume from {ckpt}: it was written for {info['total_steps']} steps, "
                                    f"this run has {total_steps}")
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if self.engine == "deepspeed":
            # The float32 master weights and Adam's moments go into DeepSpeed's partitions (the module's weights
            # are refreshed from them); frozen weights (a LoRA base) never change, so the loaded model has them.
            weights = {"model." + k: v for k, v in self._checkpoint_weights(ckpt).items()}
            dist.deepspeed_load_state(self.accelerator, self.policy, weights, tensors["optimizer"],
                                      self._group_names())
        else:
            if self.engine == "fsdp":
                self._load_sharded_weights(ckpt)
            else:
                C.load_weights(self._unwrapped(), ckpt, peft=self.use_peft)
            set_optimizer_state_dict(self._optimizer_model(), _inner_optimizer(self.optimizer), tensors["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        self._load_scheduler_state(tensors["scheduler"])
        if self.accelerator.scaler is not None and tensors["scaler"] is not None:
            self.accelerator.scaler.load_state_dict(tensors["scaler"])
        self.global_step = info["global_step"]
        self._position = tuple(info["position"])
        self.nonfinite_steps = info["nonfinite_steps"]
        self._meter = MeanMeter.from_state(info["meter"])
        log(f"resumed from {ckpt} at step {self.global_step} "
            f"(epoch {self._position[0]}, micro-batch {self._position[1]})")


def _inner_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


def _is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc)
    return (isinstance(exc, torch.cuda.OutOfMemoryError) or text.startswith("DefaultCPUAllocator: can't allocate")
            or "out of memory" in text.lower())


# --------------------------------------------------------------------------------------------------------------------
# SFT


class SFTTrainer(Trainer):
    """Supervised fine-tuning: token-mean negative log-likelihood of the completion tokens."""

    config_class = SFTConfig

    def __init__(self, model, args=None, train_dataset=None, eval_dataset=None, processing_class=None,
                 peft_config=None, **trl_arguments):
        refuse_trl_arguments(type(self).__name__, trl_arguments)
        super().__init__(model, args, train_dataset, eval_dataset, processing_class, peft_config)

    def prepare_data(self, source, split: str):
        cfg = self.args
        rows, name = self._load_rows(source, split)
        examples, report = D.sft_examples(rows, name, dataset_format=cfg.dataset_format,
                                          column_map=cfg.column_map, on_bad_rows=cfg.on_bad_rows,
                                          deduplicate=cfg.deduplicate)
        earlier = sum(isinstance(ex.prompt, list) and any(m["role"] == "assistant" for m in ex.prompt)
                      for ex in examples)
        if earlier and cfg.completion_only_loss:
            # TRL trains a `messages` row on every token; here the final turn is the completion. Say so.
            log(f"{name}: {earlier} {split} conversations have assistant turns before the final one; those turns are "
                "context (no loss) and only the final assistant turn is trained (completion_only_loss=true; false "
                "trains the whole conversation)")
        tokenized = D.tokenize_sft(examples, self.tokenizer, max_length=cfg.max_length,
                                   truncation_mode=cfg.truncation_mode, report=report)
        return _finish_data(self, tokenized, report, name, split)

    def collate(self, examples):
        if self.args.padding_free:
            return collate_packed_sft(examples, self.args.completion_only_loss)
        return collate_sft(examples, self.tokenizer.pad_token_id, self.args.completion_only_loss)

    def batch_weight(self, batch: dict) -> float:
        if "completion_lengths" in batch:
            return float(batch["completion_lengths"].sum())
        return float(batch["completion_mask"][:, 1:].sum())

    def token_budget(self) -> Optional[int]:
        return self.args.token_budget

    def pack(self, examples: list, budget: int) -> list[list]:
        return pack_by_cost(examples, [self.pack_cost(ex) for ex in examples], budget)

    def pack_cost(self, example) -> int:
        return len(example.prompt_ids) + len(example.completion_ids)

    def loss_and_metrics(self, batch: dict, train: bool):
        out = self.policy(batch_logps, batch, chunk_size=self.args.logps_chunk_size)
        n = out.lengths.sum()
        loss_sum = -out.logps.sum()
        return loss_sum, float(n), {"loss": float(loss_sum.detach() / n.clamp(min=1))}


# --------------------------------------------------------------------------------------------------------------------
# DPO and family


class DPOTrainer(Trainer):
    """Preference optimisation: policy and reference log-probs of chosen and rejected -> `dpokit.losses`."""

    config_class = DPOConfig

    def __init__(self, model, ref_model=None, args=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None, **trl_arguments):
        refuse_trl_arguments(type(self).__name__, trl_arguments)
        self._ref_model_arg = ref_model
        self.reference = None
        cfg = config_from_args(DPOConfig, args)
        # The loss is built once, from settings checked when the config was made; each step checks tensors only.
        self.loss = losses.build(cfg)
        self.spec = self.loss.spec
        # Policy and reference scores come from the loss's own rule (the sum, or LD-DPO's with ld_alpha).
        self.aggregate = self.loss.sequence_logps
        if not self.spec.needs_reference and ref_model is not None:
            raise ConfigError(f"a ref_model was given but loss_type {cfg.loss_type!r} uses no reference "
                              "(or reference_free is set)")
        for note in self.spec.notes:
            log(note)
        if ref_model is not None and ref_model is model and not isinstance(model, str):
            # The reference must stay frozen while the policy trains: one object cannot be both.
            raise ConfigError("model and ref_model are the same object; pass ref_model=None (a frozen copy of the "
                              "starting policy is made) or a separate model")
        super().__init__(model, cfg, train_dataset, eval_dataset, processing_class, peft_config)

    # ----- data -----
    def prepare_data(self, source, split: str):
        cfg = self.args
        if isinstance(source, (list, tuple)) and source and isinstance(source[0], D.TokenizedPair):
            return _finish_data(self, _pretokenized(source, cfg.max_length), D.DataReport(
                read=len(source), kept=len(source), skipped=0, format="tokenized", source="<tokenized>"),
                "<tokenized>", split)
        rows, name = self._load_rows(source, split)
        examples, report = D.preference_examples(rows, name, dataset_format=cfg.dataset_format,
                                                 column_map=cfg.column_map, on_bad_rows=cfg.on_bad_rows,
                                                 chat_template_available=bool(self.tokenizer.chat_template),
                                                 pair_strategy=cfg.pair_strategy, min_score_gap=cfg.min_score_gap,
                                                 deduplicate=cfg.deduplicate)
        tokenized = D.tokenize_preference(examples, self.tokenizer, max_length=cfg.max_length,
                                          max_prompt_length=cfg.max_prompt_length,
                                          max_completion_length=cfg.max_completion_length,
                                          truncation_mode=cfg.truncation_mode, report=report)
        return _finish_data(self, tokenized, report, name, split)

    def collate(self, pairs):
        if self.args.padding_free:
            return collate_packed(pairs, shared_prompt=self.args.share_prompt)
        return collate_pairs(pairs, self.tokenizer.pad_token_id)

    def batch_weight(self, batch: dict) -> float:
        return float(len(batch["row"]))

    def token_budget(self) -> Optional[int]:
        return self.args.token_budget

    def pack(self, pairs: list, budget: int) -> list[list]:
        return pack_pairs(pairs, budget, shared_prompt=self.args.share_prompt)

    def pack_cost(self, pair) -> int:
        return pair_tokens(pair, self.args.share_prompt)

    # ----- reference -----
    def setup_reference_before_peft(self) -> None:
        """The default reference is the starting policy: copy it now, before LoRA wraps it or training moves it."""
        cfg = self.args
        self._ref_module = None
        if not self.spec.needs_reference:
            return
        ref = self._ref_model_arg if self._ref_model_arg is not None else cfg.ref_model_name_or_path
        if ref is not None:
            self._ref_module = load_model(ref, cfg, what="ref_model")
            vocab = self._ref_module.get_input_embeddings().num_embeddings
            for split in ("train", "eval"):
                examples = getattr(self, f"{split}_examples")
                if examples is not None:
                    try:
                        check_vocab(examples, vocab, self.data_reports[split].where)
                    except DpokitError as e:
                        raise DpokitError(f"ref_model: {e}") from None
            if cfg.disable_dropout:
                disable_dropout(self._ref_module)
        elif not self.use_peft:
            self._ref_module = frozen_copy(self.model)

    def setup_reference(self) -> None:
        cfg = self.args
        if cfg.padding_free and self._ref_module is not None:
            enable_packed_attention(self._ref_module)  # the reference runs the same packed batches
        if not self.spec.needs_reference:
            self.reference = None
            return
        if self._ref_module is not None:
            ref = ModelReference(self._ref_module.to(self.accelerator.device), self.aggregate,
                                 cfg.logps_chunk_size, self.autocast)
            ref_fp = model_fingerprint(self._ref_module) if cfg.precompute_ref_log_probs else None
        else:
            ref = AdapterOffReference(self.model, self.aggregate, cfg.logps_chunk_size, self.autocast)
            ref_fp = None
            if cfg.precompute_ref_log_probs:
                ref_fp = model_fingerprint(self.model, skip=lambda name: "lora_" in name)
        if not cfg.precompute_ref_log_probs:
            self.reference = ref
            return
        # Precompute over train and eval rows once; the cache key covers the reference weights, the exact token ids,
        # the aggregation (ld_alpha) and the precision, so a stale cache can never be read.
        self.model.to(self.accelerator.device)
        self.reference = {}
        for split, examples in (("train", self.train_examples), ("eval", self.eval_examples)):
            if examples is None:
                continue
            key = _sha(ref_fp, data_fingerprint(examples), str(cfg.ld_alpha), str(cfg.bf16), str(cfg.fp16))
            # Each rank computes its share (before the engine wraps anything: the model is whole on every rank
            # here, so no collective runs inside); `precompute` gathers the shares into the full table.
            loader = DataLoader(self._rank_slice(examples), shuffle=False, collate_fn=self.collate,
                                batch_size=cfg.precompute_ref_batch_size or cfg.per_device_eval_batch_size)
            batches = (self._to_device(b) for b in loader)
            num_rows = max(int(p.row) for p in examples) + 1
            self.reference[split] = precompute(ref, batches, num_rows, cache_key=key, accelerator=self.accelerator)
            self.ref_cache_keys[split] = key
            log(f"reference log-probs for {len(examples)} {split} pairs precomputed (cache key {key[:12]})")
        # Free the reference model: the whole point of precomputing is not to hold it during training.
        self._ref_module = None
        del ref

    def ref_logps(self, batch: dict, train: bool) -> Optional[torch.Tensor]:
        if self.reference is None:
            return None
        if isinstance(self.reference, dict):
            return self.reference["train" if train else "eval"].logps(batch)
        return self.reference.logps(batch)

    # ----- loss -----
    def loss_and_metrics(self, batch: dict, train: bool):
        cfg = self.args
        b = len(batch["row"])
        out = self.policy(batch_logps, batch, chunk_size=cfg.logps_chunk_size,
                          with_weights=self.spec.needs_weight_logps)
        policy = self.loss.sequence_logps(out)
        ref = self.ref_logps(batch, train)
        weights = {}
        if self.spec.needs_weight_logps:
            weights = dict(chosen_weight_logps=out.weight_logps[:b], rejected_weight_logps=out.weight_logps[b:])
        result = self.loss(
            policy[:b], policy[b:],
            None if ref is None else ref[:b].to(policy.dtype), None if ref is None else ref[b:].to(policy.dtype),
            chosen_lengths=out.lengths[:b], rejected_lengths=out.lengths[b:], **weights)
        chosen_r, rejected_r = result.chosen_rewards, result.rejected_rewards
        metrics = {
            "loss": float(result.losses.detach().mean()),
            "rewards/chosen": float(chosen_r.mean()),
            "rewards/rejected": float(rejected_r.mean()),
            "rewards/accuracies": float((chosen_r > rejected_r).float().mean()),
            "rewards/margins": float((chosen_r - rejected_r).mean()),
            # The scores the loss reads, as TRL logs them (with ld_alpha, the length-desensitised sums).
            "logps/chosen": float(policy[:b].detach().mean()),
            "logps/rejected": float(policy[b:].detach().mean()),
        }
        for k, v in (result.metrics or {}).items():
            metrics[k] = float(v.detach().float().mean()) if isinstance(v, torch.Tensor) else float(v)
        return result.losses.sum(), float(b), metrics


def _due(strategy: str, every: Optional[int], step: int, epoch_end: bool) -> bool:
    """Whether an interval action (logging, evaluation, saving) runs after optimizer step `step`."""
    if strategy == "steps":
        return bool(every) and step % every == 0
    return strategy == "epoch" and epoch_end


def data_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order in which training examples are drawn in `epoch`: a permutation from a generator of its own, seeded by
    (seed, epoch), so it is the same on every rank, on resume, and for anyone replaying a run (e.g. `dpokit bench`)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def _pretokenized(pairs, max_length: Optional[int]) -> list:
    """Pairs already tokenized by dpokit (`dpokit.data.tokenize_preference`, e.g. once for several runs), used as
    given: nothing is cut here, so a pair over `max_length` or with an empty completion is an error, not trained on."""
    for i, p in enumerate(pairs):
        if not isinstance(p, D.TokenizedPair):
            raise DataError(f"<tokenized> row {i}: a {type(p).__name__} among TokenizedPair rows")
        for field_name in ("chosen_ids", "rejected_ids"):
            if len(getattr(p, field_name)) == 0:
                raise DataError(f"<tokenized> row {i}: field {field_name!r} is empty (no completion to train on)")
        longest = len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))
        if max_length is not None and longest > max_length:
            raise DataError(f"<tokenized> row {i}: {longest} tokens, more than max_length={max_length} (pre-tokenized"
                            " pairs are not truncated; tokenize with the run's max_length or raise it)")
    return list(pairs)


def _example_tokens(example) -> int:
    """Tokens of one example (all its token-id fields), to balance the ranks' loads."""
    return sum(len(v) for v in vars(example).values() if isinstance(v, np.ndarray))


def _finish_data(trainer: Trainer, tokenized, report, name: str, split: str):
    """Print and keep the data report (written with the run, skipped rows included, by `_write_data_report`);
    refuse an empty set."""
    log(report.summary())
    trainer.data_reports = getattr(trainer, "data_reports", {})
    trainer.data_reports[split] = report
    trainer.data_sources = getattr(trainer, "data_sources", {})
    trainer.data_sources[split] = name
    if not tokenized:
        raise DpokitError(f"{name}: no usable {split} rows left after validation and truncation ({report.summary()})")
    return tokenized


def _sha(*parts: Optional[str]) -> str:
    import hashlib

    return hashlib.sha256("\x00".join(p or "" for p in parts).encode()).hexdigest()
