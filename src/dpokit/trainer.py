"""The training loop: setup -> step -> evaluate -> save, for SFT and for DPO and its family.

`Trainer` owns everything both share (model and tokenizer loading, LoRA, the optimizer, the schedule, gradient
accumulation, logging, checkpoints); `SFTTrainer` and `DPOTrainer` only say how data becomes batches and how a batch
becomes a loss. The loss itself comes from `dpokit.losses`; this module reads only its spec (does it need a reference?
lengths? WPO weights?) and never tests a loss name.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from dpokit import data as D
from dpokit import losses
from dpokit.config import DPOConfig, SFTConfig, TrainConfig, config_from_args
from dpokit.data.collate import collate_pairs, collate_sft
from dpokit.errors import ConfigError, DpokitError
from dpokit.logps import CompletionLogps, completion_logps
from dpokit.reference import (AdapterOffReference, ModelReference, data_fingerprint, frozen_copy,
                              model_fingerprint, precompute)

RUN_MARKER = "dpokit_config.yaml"  # its presence marks an output_dir holding a run


def log(msg: str) -> None:
    """Run notices (counts of truncated/dropped rows, substitutions like pad=EOS) go to stdout, always."""
    print(f"[dpokit] {msg}", flush=True)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
    kwargs.setdefault("dtype", torch.float32)  # master weights in float32; bf16/fp16 come from autocast
    kwargs.setdefault("trust_remote_code", cfg.trust_remote_code)
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
            tok = AutoTokenizer.from_pretrained(str(source), trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise DpokitError(f"cannot load tokenizer {str(source)!r}: {str(exc).splitlines()[0]}") from exc
    if cfg.chat_template:
        path = Path(cfg.chat_template)
        tok.chat_template = path.read_text() if path.is_file() else cfg.chat_template
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ConfigError("the tokenizer has neither a pad token nor an EOS token; add one")
        # Padding positions are masked out of attention and loss, so any id works; EOS is the usual choice.
        tok.pad_token = tok.eos_token
        log(f"tokenizer has no pad token; using EOS {tok.eos_token!r} (id {tok.eos_token_id}) for padding")
    return tok


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
        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules=targets or "all-linear", task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, peft_config)
    except ValueError as exc:
        raise ConfigError(f"LoRA: {str(exc).splitlines()[0]}") from exc


def check_vocab(examples, vocab_size: int, source: str) -> None:
    """Token ids beyond the embedding table would index out of range deep in the model: name the row instead."""
    for ex in examples:
        for field_name, ids in vars(ex).items():
            if isinstance(ids, np.ndarray) and len(ids) and int(ids.max()) >= vocab_size:
                raise DpokitError(f"{source}: row {ex.row}: field {field_name!r} has token id {int(ids.max())} "
                                  f">= the model's vocabulary size {vocab_size} (tokenizer and model do not match)")


class MetricsSink:
    """metrics.jsonl (always) and TensorBoard (report_to) — one record per logging step."""

    def __init__(self, output_dir: Path, tensorboard: bool, enabled: bool):
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(output_dir / "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: (round(v, 8) if isinstance(v, float) else v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


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


# --------------------------------------------------------------------------------------------------------------------
# The shared loop


class Trainer:
    """Subclasses define `config_class`, `prepare_data(source, name)`, `collate(examples)` and
    `loss_and_metrics(batch) -> (loss_sum, weight, metrics)`, where the step's loss is loss_sum / total weight over
    the micro-batches of one optimizer step (so gradient accumulation equals one big batch exactly)."""

    config_class: type = TrainConfig

    def __init__(self, model, args=None, train_dataset=None, eval_dataset=None, processing_class=None,
                 peft_config=None):
        from accelerate import Accelerator

        self.args = cfg = config_from_args(self.config_class, args)
        if model is None:
            model = cfg.model_name_or_path
        if model is None:
            raise ConfigError("no model: pass a model or set model_name_or_path")
        self.output_dir = Path(cfg.output_dir)
        set_seed(cfg.seed)
        if cfg.fp16 and not torch.cuda.is_available():
            raise ConfigError("fp16 needs a CUDA GPU; on CPU use bf16 or neither")
        self.accelerator = Accelerator(mixed_precision="bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "no")
        self.tokenizer = load_tokenizer(processing_class, model, cfg)
        # Data before the model: a bad row should fail in seconds, not after loading billions of weights.
        train_source = train_dataset if train_dataset is not None else cfg.train_file
        eval_source = eval_dataset if eval_dataset is not None else cfg.eval_file
        self.train_examples = self.prepare_data(train_source, "train") if train_source is not None else None
        self.eval_examples = self.prepare_data(eval_source, "eval") if eval_source is not None else None
        self.model = load_model(model, cfg)
        vocab = self.model.get_input_embeddings().num_embeddings
        for split, examples in (("train", self.train_examples), ("eval", self.eval_examples)):
            if examples is not None:
                check_vocab(examples, vocab, self.data_sources[split])
        if cfg.disable_dropout:
            disable_dropout(self.model)
        self.use_peft = cfg.use_peft or peft_config is not None
        self.setup_reference_before_peft()
        if self.use_peft:
            self.model = apply_lora(self.model, cfg, peft_config)
        if cfg.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(self.model, "enable_input_require_grads"):
                self.model.enable_input_require_grads()  # so checkpointed blocks see a grad path under LoRA
        self.model.train()
        self.setup_reference()

        self.model = self.model.to(self.accelerator.device)
        self.global_step = 0
        self.optimizer = self.scheduler = None

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
        return self.accelerator.autocast()

    def _train_loader(self, epoch: int) -> DataLoader:
        # A fresh generator per epoch, seeded by (seed, epoch): the data order is a pure function of the config.
        g = torch.Generator().manual_seed(self.args.seed + epoch)
        return DataLoader(self.train_examples, batch_size=self.args.per_device_train_batch_size, shuffle=True,
                          generator=g, collate_fn=self.collate, drop_last=False)

    def _eval_loader(self) -> DataLoader:
        return DataLoader(self.eval_examples, batch_size=self.args.per_device_eval_batch_size, shuffle=False,
                          collate_fn=self.collate)

    def _micro_batches(self):
        """Endless (epoch, batch) stream over the training data."""
        epoch = 0
        while True:
            for batch in self._train_loader(epoch):
                yield epoch, batch
            epoch += 1

    def _total_steps(self) -> int:
        cfg = self.args
        per_epoch = math.ceil(math.ceil(len(self.train_examples) / cfg.per_device_train_batch_size)
                              / cfg.gradient_accumulation_steps)
        return cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.num_train_epochs * per_epoch))

    def _make_optimizer(self, total_steps: int) -> None:
        from transformers import get_scheduler

        cfg = self.args
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = self.accelerator.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                           eps=cfg.adam_epsilon, fused=fused)
        warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total_steps)
        self.scheduler = get_scheduler(cfg.lr_scheduler_type, self.optimizer, num_warmup_steps=warmup,
                                       num_training_steps=total_steps)

    def _check_output_dir(self) -> None:
        cfg = self.args
        if (self.output_dir / RUN_MARKER).exists() and not cfg.overwrite_output_dir:
            raise ConfigError(f"output_dir {str(self.output_dir)!r} already holds a run; "
                              "set overwrite_output_dir=true or choose another output_dir")
        if cfg.overwrite_output_dir and (self.output_dir / "metrics.jsonl").exists():
            (self.output_dir / "metrics.jsonl").unlink()

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.accelerator.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    # ----- the loop -----
    def train(self) -> dict:
        """Run the optimisation; returns the last logged training metrics."""
        cfg, acc = self.args, self.accelerator
        if self.train_examples is None:
            raise ConfigError("no training data: pass train_dataset= or set train_file")
        self._check_output_dir()
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.output_dir / RUN_MARKER)
        total_steps = self._total_steps()
        self._make_optimizer(total_steps)
        self.model, self.optimizer = acc.prepare(self.model, self.optimizer)
        sink = MetricsSink(self.output_dir, cfg.report_to_tensorboard, acc.is_main_process)
        meter, last = MeanMeter(), {}
        stream = self._micro_batches()
        bar = None
        if not cfg.disable_tqdm and acc.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=total_steps, desc=type(self).__name__, dynamic_ncols=True)
        self.model.train()
        while self.global_step < total_steps:
            t0 = time.perf_counter()
            epoch = 0
            micro = []
            for _ in range(cfg.gradient_accumulation_steps):
                epoch, batch = next(stream)
                micro.append(self._to_device(batch))
            total_weight = float(sum(self.batch_weight(b) for b in micro))
            step_metrics = MeanMeter()
            tokens = 0
            for i, batch in enumerate(micro):
                sync = i == len(micro) - 1
                ctx = contextlib.nullcontext() if sync else acc.no_sync(self.model)
                with ctx:
                    with self.autocast():
                        loss_sum, weight, metrics = self.loss_and_metrics(batch, train=True)
                    acc.backward(loss_sum / total_weight)
                step_metrics.add(metrics, weight)
                tokens += int(batch["attention_mask"].sum())
            grad_norm = self._clip_and_check(micro)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.global_step += 1
            elapsed = time.perf_counter() - t0
            record = step_metrics.means()
            record.update(grad_norm=grad_norm, learning_rate=self.scheduler.get_last_lr()[0],
                          tokens_per_second=tokens / max(elapsed, 1e-9))
            meter.add(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
            if self.global_step % cfg.logging_steps == 0 or self.global_step == total_steps:
                last = {**meter.means(), "epoch": epoch}
                sink.write(self.global_step, last)
                meter = MeanMeter()
            if self.eval_examples is not None and cfg.eval_steps and self.global_step % cfg.eval_steps == 0 \
                    and self.global_step < total_steps:
                sink.write(self.global_step, self.evaluate())
            if cfg.save_steps and self.global_step % cfg.save_steps == 0 and self.global_step < total_steps:
                self._save_checkpoint()
        if bar is not None:
            bar.close()
        if self.eval_examples is not None:
            sink.write(self.global_step, self.evaluate())
        sink.close()
        return last

    def batch_weight(self, batch: dict) -> float:
        raise NotImplementedError

    def _clip_and_check(self, micro: list) -> float:
        """Clip the gradient norm; a non-finite norm stops the run naming the step and the rows (never trains on it)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            norm = self.accelerator.clip_grad_norm_(params, self.args.max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        norm = float(norm)
        if not math.isfinite(norm):
            rows = sorted(int(r) for b in micro for r in b["row"].tolist())
            raise DpokitError(f"non-finite gradient norm at step {self.global_step + 1} (rows {rows}); "
                              "stopped before the optimizer step")
        return norm

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The training metrics on `eval_dataset`, prefixed `eval/`."""
        if self.eval_examples is None:
            raise ConfigError("no eval data: pass eval_dataset= or set eval_file")
        was_training = self.model.training
        self.model.eval()
        meter = MeanMeter()
        for batch in self._eval_loader():
            batch = self._to_device(batch)
            with self.autocast():
                _, weight, metrics = self.loss_and_metrics(batch, train=False)
            meter.add(metrics, weight)
        if was_training:
            self.model.train()
        return {f"eval/{k}": v for k, v in meter.means().items()}

    # ----- saving -----
    def _unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def save_model(self, output_dir: Optional[str] = None) -> Path:
        """The model (or LoRA adapter) in Hugging Face format plus the tokenizer, written atomically into `output_dir`:
        everything goes to a temporary directory first and is moved in only when complete."""
        out = Path(output_dir or self.args.output_dir)
        if not self.accelerator.is_main_process:
            return out
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".tmp-save-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        self._unwrapped().save_pretrained(str(tmp), safe_serialization=True)
        self.tokenizer.save_pretrained(str(tmp))
        for item in tmp.iterdir():
            os.replace(item, out / item.name)
        tmp.rmdir()
        if not (out / RUN_MARKER).exists():
            self.args.save(out / RUN_MARKER)
        return out

    def _save_checkpoint(self) -> None:
        ckpt = self.output_dir / f"checkpoint-{self.global_step}"
        tmp = self.output_dir / f".tmp-checkpoint-{self.global_step}"
        if self.accelerator.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            self.save_model(str(tmp))
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "global_step": self.global_step}, tmp / "trainer_state.pt")
            if ckpt.exists():
                shutil.rmtree(ckpt)
            os.replace(tmp, ckpt)
            self._rotate_checkpoints()

    def _rotate_checkpoints(self) -> None:
        limit = self.args.save_total_limit
        if not limit:
            return
        ckpts = sorted(self.output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        for old in ckpts[:-limit]:
            shutil.rmtree(old)


# --------------------------------------------------------------------------------------------------------------------
# SFT


class SFTTrainer(Trainer):
    """Supervised fine-tuning: token-mean negative log-likelihood of the completion tokens."""

    config_class = SFTConfig

    def prepare_data(self, source, split: str):
        cfg = self.args
        rows, name = D.load_rows(source)
        examples, report = D.sft_examples(rows, name, dataset_format=cfg.dataset_format,
                                          column_map=cfg.column_map, on_bad_rows=cfg.on_bad_rows)
        tokenized = D.tokenize_sft(examples, self.tokenizer, max_length=cfg.max_length,
                                   truncation_mode=cfg.truncation_mode, report=report)
        return _finish_data(self, tokenized, report, name, split)

    def collate(self, examples):
        return collate_sft(examples, self.tokenizer.pad_token_id, self.args.completion_only_loss)

    def batch_weight(self, batch: dict) -> float:
        return float(batch["completion_mask"][:, 1:].sum())

    def loss_and_metrics(self, batch: dict, train: bool):
        out = completion_logps(self.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                               chunk_size=self.args.logps_chunk_size)
        n = out.lengths.sum()
        loss_sum = -out.logps.sum()
        return loss_sum, float(n), {"loss": float(loss_sum.detach() / n.clamp(min=1))}


# --------------------------------------------------------------------------------------------------------------------
# DPO and family


class DPOTrainer(Trainer):
    """Preference optimisation: policy and reference log-probs of chosen and rejected -> `dpokit.losses`."""

    config_class = DPOConfig

    def __init__(self, model, ref_model=None, args=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None):
        self._ref_model_arg = ref_model
        self.reference = None
        cfg = config_from_args(DPOConfig, args)
        self.spec = cfg.loss_spec()
        if not self.spec.needs_reference and ref_model is not None:
            raise ConfigError(f"a ref_model was given but loss_type {cfg.loss_type!r} uses no reference "
                              "(or reference_free is set)")
        super().__init__(model, cfg, train_dataset, eval_dataset, processing_class, peft_config)

    # ----- data -----
    def prepare_data(self, source, split: str):
        cfg = self.args
        rows, name = D.load_rows(source)
        examples, report = D.preference_examples(rows, name, dataset_format=cfg.dataset_format,
                                                 column_map=cfg.column_map, on_bad_rows=cfg.on_bad_rows,
                                                 chat_template_available=bool(self.tokenizer.chat_template))
        tokenized = D.tokenize_preference(examples, self.tokenizer, max_length=cfg.max_length,
                                          max_prompt_length=cfg.max_prompt_length,
                                          max_completion_length=cfg.max_completion_length,
                                          truncation_mode=cfg.truncation_mode, report=report)
        return _finish_data(self, tokenized, report, name, split)

    def collate(self, pairs):
        return collate_pairs(pairs, self.tokenizer.pad_token_id)

    def batch_weight(self, batch: dict) -> float:
        return float(len(batch["row"]))

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
            if cfg.disable_dropout:
                disable_dropout(self._ref_module)
        elif not self.use_peft:
            self._ref_module = frozen_copy(self.model)

    def setup_reference(self) -> None:
        cfg = self.args
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
            loader = DataLoader(examples, batch_size=cfg.per_device_eval_batch_size, shuffle=False,
                                collate_fn=self.collate)
            batches = (self._to_device(b) for b in loader)
            num_rows = max(int(p.row) for p in examples) + 1
            self.reference[split] = precompute(ref, batches, num_rows, cache_key=key)
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
    def aggregate(self, out: CompletionLogps) -> torch.Tensor:
        """One score per sequence: the summed completion log-probs, or LD-DPO's length-desensitised sum."""
        if self.args.ld_alpha is None:
            return out.logps
        b = out.logps.shape[0] // 2
        public = torch.minimum(out.lengths[:b], out.lengths[b:]).repeat(2)
        return losses.ld_aggregate(out.token_logps, out.mask, public, self.args.ld_alpha)

    def loss_and_metrics(self, batch: dict, train: bool):
        cfg = self.args
        b = len(batch["row"])
        out = completion_logps(self.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                               chunk_size=cfg.logps_chunk_size, with_weights=self.spec.needs_weight_logps)
        policy = self.aggregate(out)
        ref = self.ref_logps(batch, train)
        weights = {}
        if self.spec.needs_weight_logps:
            weights = dict(chosen_weight_logps=out.weight_logps[:b], rejected_weight_logps=out.weight_logps[b:])
        result = losses.preference_loss(
            cfg.loss_type, policy[:b], policy[b:],
            None if ref is None else ref[:b].to(policy.dtype), None if ref is None else ref[b:].to(policy.dtype),
            chosen_lengths=out.lengths[:b], rejected_lengths=out.lengths[b:], **cfg.loss_params(), **weights)
        chosen_r, rejected_r = result.chosen_rewards, result.rejected_rewards
        metrics = {
            "loss": float(result.losses.detach().mean()),
            "rewards/chosen": float(chosen_r.mean()),
            "rewards/rejected": float(rejected_r.mean()),
            "rewards/accuracies": float((chosen_r > rejected_r).float().mean()),
            "rewards/margins": float((chosen_r - rejected_r).mean()),
            "logps/chosen": float(out.logps[:b].detach().mean()),
            "logps/rejected": float(out.logps[b:].detach().mean()),
        }
        for k, v in (result.metrics or {}).items():
            metrics[k] = float(v.detach().float().mean()) if isinstance(v, torch.Tensor) else float(v)
        return result.losses.sum(), float(b), metrics


def _finish_data(trainer: Trainer, tokenized, report, name: str, split: str):
    """Print and keep the data report; refuse an empty set; check token ids against the model's vocabulary."""
    log(report.summary())
    trainer.data_reports = getattr(trainer, "data_reports", {})
    trainer.data_reports[split] = report
    trainer.data_sources = getattr(trainer, "data_sources", {})
    trainer.data_sources[split] = name
    if report.skipped_rows and trainer.accelerator.is_main_process:
        trainer.output_dir.mkdir(parents=True, exist_ok=True)
        with (trainer.output_dir / "skipped_rows.jsonl").open("a" if split != "train" else "w") as f:
            for item in report.skipped_rows:
                f.write(json.dumps({"split": split, "source": name, **item}) + "\n")
    if not tokenized:
        raise DpokitError(f"{name}: no usable {split} rows left after validation and truncation ({report.summary()})")
    return tokenized


def _sha(*parts: Optional[str]) -> str:
    import hashlib

    return hashlib.sha256("\x00".join(p or "" for p in parts).encode()).hexdigest()
