"""Run configuration: one dataclass per command, each field documented once (the string under it).

Field names are TRL's `DPOConfig` / transformers' `TrainingArguments` names wherever the meaning is the same, so a
TRL config ports without renames. A config comes from defaults, then a YAML file of flat keys, then `key=value`
overrides (CLI), and is checked in one place: `validate()`. The docstrings under the fields are read back (with `ast`)
for `dpokit <cmd> --help`, so the documentation cannot drift from the code.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import inspect
import math
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from dpokit.errors import ConfigError

REPORT_SINKS = ("none", "tensorboard", "wandb", "all")


@dataclass
class TrainConfig:
    """Fields shared by every training command (SFT and DPO)."""

    # ----- model and data -----
    model_name_or_path: Optional[str] = None
    """Policy to train: a Hugging Face model directory or hub id (the Python API also takes an in-memory model)."""
    tokenizer_name_or_path: Optional[str] = None
    """Tokenizer directory or hub id; defaults to `model_name_or_path`."""
    model_init_kwargs: Optional[dict] = None
    """Extra keyword arguments for `AutoModelForCausalLM.from_pretrained` (e.g. {attn_implementation: sdpa})."""
    model_revision: str = "main"
    """Branch, tag or commit of a hub model (and of its tokenizer) to load."""
    dtype: str = "float32"
    """Dtype the weights are loaded in: float32 (master weights for bf16/fp16 autocast), bfloat16, float16 or auto
    (the checkpoint's own). A `dtype` in `model_init_kwargs` wins."""
    attn_implementation: Optional[str] = None
    """Attention kernel of the loaded model, e.g. sdpa, eager, flash_attention_2 (default: transformers' choice).
    With `padding_free`, packed rows use dpokit's exact variable-length attention whatever this says."""
    trust_remote_code: bool = False
    """Allow model code from the model's repository to run. Off unless asked: it executes code you did not write."""
    train_file: Optional[str] = None
    """Training data: .jsonl/.json/.csv/.tsv/.parquet/.arrow (optionally .gz) or a `save_to_disk` directory."""
    eval_file: Optional[str] = None
    """Held-out data in the same formats; evaluated as `eval_strategy` says (by default at the end of training)."""
    dataset_name: Optional[str] = None
    """TRL scripts' data source, used when `train_file` is not set: a hub id, a `save_to_disk` directory or a file.
    Training reads its `dataset_train_split`; evaluation reads its `dataset_test_split` when `eval_strategy` is steps
    or epoch and no `eval_file` is given."""
    dataset_config: Optional[str] = None
    """Configuration name of a hub `dataset_name` (the `name` of `datasets.load_dataset`)."""
    dataset_train_split: str = "train"
    """Split trained on when the data source has splits (a DatasetDict, a `save_to_disk` directory, a hub id)."""
    dataset_test_split: str = "test"
    """Split evaluated on when the evaluation source has splits."""
    dataset_format: str = "auto"
    """Row format: `auto` (detected from the columns) or a format name from `dpokit.data`."""
    column_map: Optional[dict] = None
    """Rename columns before reading, e.g. {question: prompt, good: chosen, bad: rejected}."""
    on_bad_rows: str = "error"
    """`error`: stop before training at a malformed row (naming file, row, field); `skip`: drop it, count it and
    write it with its reason to `output_dir/skipped_rows.jsonl`."""
    deduplicate: bool = False
    """Drop rows that repeat an earlier row exactly (counted as `deduplicated` in the data report)."""
    chat_template: Optional[str] = None
    """Jinja chat template (or a path to a file holding one) for conversational data when the tokenizer has none."""
    pad_token: Optional[str] = None
    """Token used for padding (it must be in the vocabulary); default: the tokenizer's pad token, else its EOS."""
    eos_token: Optional[str] = None
    """Token that ends every completion (it must be in the vocabulary; e.g. a chat model's end-of-turn token);
    default: the tokenizer's EOS. The saved tokenizer keeps it, so sampling stops there too."""
    max_length: Optional[int] = 1024
    """Longest prompt+completion in tokens; longer rows are cut per `truncation_mode`, and counted."""
    max_prompt_length: Optional[int] = None
    """Longest prompt in tokens; longer prompts lose tokens from the left (their start)."""
    max_completion_length: Optional[int] = None
    """Longest completion in tokens; longer completions lose tokens from the right (their end)."""
    truncation_mode: str = "keep_start"
    """How `max_length` cuts: `keep_start` drops the end of the sequence, `keep_end` drops the start of the prompt.
    A row whose completion would lose every token is dropped and counted, never trained on."""

    # ----- optimisation -----
    output_dir: str = "runs/dpokit"
    """Where the final model (HF format), the resolved config, metrics.jsonl and checkpoints are written."""
    overwrite_output_dir: bool = False
    """Allow writing into an `output_dir` that already holds a finished run."""
    per_device_train_batch_size: int = 8
    """Training examples (pairs for DPO) per device per micro-batch."""
    per_device_eval_batch_size: int = 8
    """Evaluation examples per device per batch."""
    gradient_accumulation_steps: int = 1
    """Micro-batches summed before each optimizer step."""
    learning_rate: float = 1e-6
    """Peak learning rate of AdamW."""
    optim: str = "adamw_torch_fused"
    """Optimizer: adamw_torch_fused (torch's fused AdamW where the device has it: CUDA) or adamw_torch (its
    multi-tensor AdamW). The same update either way; other transformers optimizer names are refused."""
    lr_scheduler_type: str = "linear"
    """A transformers scheduler name: linear, cosine, constant, constant_with_warmup, cosine_with_min_lr, ..."""
    lr_scheduler_kwargs: Optional[dict] = None
    """Extra arguments of the scheduler, e.g. {min_lr_rate: 0.1} for cosine_with_min_lr, {power: 2.0} for polynomial."""
    warmup_ratio: float = 0.0
    """Fraction of the optimizer steps spent warming up linearly (ignored when `warmup_steps` > 0)."""
    warmup_steps: Union[int, float] = 0
    """Optimizer steps of linear warmup: an integer, or a float in (0, 1) for that fraction of all steps (as in
    transformers v5); overrides `warmup_ratio` when > 0."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norm weights)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    num_train_epochs: float = 3.0
    """Passes over the training data (fractions allowed); ignored when `max_steps` > 0."""
    max_steps: int = -1
    """Total optimizer steps; > 0 overrides `num_train_epochs`."""
    seed: int = 42
    """Seed for python, numpy and torch (weights of new heads, dropout) and, unless `data_seed` is set, data order."""
    data_seed: Optional[int] = None
    """Seed of the order in which training examples are drawn (default: `seed`)."""
    full_determinism: bool = False
    """Deterministic kernels everywhere (transformers' `enable_full_determinism`): reproducible on GPU, slower."""
    bf16: Optional[bool] = None
    """Mixed precision with bfloat16 autocast (weights stay in their loaded dtype). null (the default, TRL's): on
    where the GPU supports bf16 unless fp16 is set, off on CPU; the run records the value it took."""
    fp16: bool = False
    """Mixed precision with float16 autocast and a gradient scaler (GPU only)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    gradient_checkpointing_kwargs: Optional[dict] = None
    """Arguments of torch's checkpoint (default: {use_reentrant: false}); with a transformers that has
    `activation_checkpointing_enable` (5.24 has it) also `every_n_layers` (checkpoint only every n-th layer) and
    `offload` (saved activations in host memory)."""
    tf32: Optional[bool] = None
    """TF32 matmuls on an Ampere or newer NVIDIA GPU (true/false; null leaves torch's setting). Needs CUDA."""
    use_cpu: bool = False
    """Train on the CPU even when a GPU is present."""
    torch_compile: bool = False
    """Compile each decoder layer of the policy (and of a reference model) with `torch.compile` (regional
    compilation: one compile serves every layer). Pays on a GPU after the first steps; shapes vary from batch to
    batch, so they are compiled as dynamic."""
    torch_compile_backend: Optional[str] = None
    """`torch.compile` backend (default: inductor, which on CPU needs a C++ compiler)."""
    torch_compile_mode: Optional[str] = None
    """`torch.compile` mode, e.g. "max-autotune-no-cudagraphs" (default: torch's)."""
    disable_dropout: bool = True
    """Set every dropout probability to 0 in policy and reference, so log-probs are deterministic."""

    # ----- logging, evaluation, checkpoints -----
    run_name: Optional[str] = None
    """A name for the run, shown by `dpokit report` (default: the output directory's name)."""
    logging_strategy: str = "steps"
    """When averaged training metrics are logged: `steps` (every `logging_steps`), `epoch` (at each epoch's end) or
    `no`. The last step is always logged."""
    logging_steps: Union[int, float] = 10
    """Log every this many optimizer steps (a float in (0, 1): that fraction of all steps)."""
    logging_first_step: bool = False
    """Also log the first optimizer step."""
    log_level: str = "passive"
    """dpokit's notices on stdout: passive/debug/info/warning print them; error/critical keep only errors."""
    eval_strategy: Optional[str] = None
    """When to evaluate (with `eval_file` or `dataset_name`'s test split): `steps` (every `eval_steps`, which defaults
    to `logging_steps`, and at the end), `epoch` (at each epoch's end), `no` (never). null: every `eval_steps` if it is
    set, and at the end of training."""
    eval_steps: Optional[Union[int, float]] = None
    """Evaluate every this many optimizer steps (a float in (0, 1): that fraction of all steps)."""
    eval_on_start: bool = False
    """Also evaluate before the first step (the starting model's numbers, as a baseline)."""
    save_strategy: str = "steps"
    """When checkpoints are written: `steps` (every `save_steps`), `epoch` (at each epoch's end) or `no`. The final
    model is always written to `output_dir`."""
    save_steps: Union[int, float] = 500
    """Write a checkpoint every this many optimizer steps (0: none; a float in (0, 1): that fraction of all steps)."""
    save_total_limit: Optional[int] = None
    """Keep at most this many checkpoints, deleting the oldest once a new one is complete."""
    resume_from_checkpoint: Optional[str] = None
    """Continue a stopped run exactly: `latest` (the newest complete checkpoint in `output_dir`; a fresh start if none
    was written yet) or a `checkpoint-N` directory. The later losses and final weights equal those of a run that was
    never stopped; the config must match the checkpoint's (only output, logging, eval and save settings may change).
    Command line: `--resume` (latest) or `--resume PATH`."""
    on_nonfinite: str = "stop"
    """What a NaN/Inf loss or gradient does, detected before the optimizer step: `stop` (the run ends naming the step
    and the batch's rows; the last checkpoint stays intact) or `skip` (that step makes no update but still counts toward `max_steps` and the schedule; logged as
    `nonfinite_steps`)."""
    max_nonfinite_steps: int = 10
    """With `on_nonfinite: skip`, the most steps that may be skipped; one more stops the run as `stop` would."""
    report_to: Union[str, list] = "none"
    """Metric sinks besides metrics.jsonl: `none`, `tensorboard`, `wandb` (Weights & Biases, as transformers logs to
    it: project from WANDB_PROJECT, run name `run_name`, metrics as train/... and eval/...; needs `pip install
    wandb`), a list of them, or `all` (tensorboard, and wandb where installed)."""
    disable_tqdm: bool = False
    """Hide the progress bar."""

    # ----- LoRA (peft) -----
    use_peft: bool = False
    """Train LoRA adapters instead of all weights."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = lora_alpha / lora_r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input (kept even with `disable_dropout`, as in TRL, since it regularises the adapter)."""
    lora_target_modules: Optional[Union[str, list]] = None
    """Module names to adapt (list or comma-separated); None means every linear layer but the LM head."""
    lora_modules_to_save: Optional[Union[str, list]] = None
    """Modules trained in full beside the adapters and saved with them (e.g. [lm_head, embed_tokens])."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale by lora_alpha / sqrt(lora_r) (arXiv 2312.03732)."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA, arXiv 2402.09353)."""

    # ----- processes (DDP) -----
    ddp_backend: Optional[str] = None
    """Process-group backend (nccl, gloo, ...; default: accelerate's choice for the device)."""
    ddp_timeout: int = 1800
    """Seconds a collective may wait before the process group gives up."""
    ddp_find_unused_parameters: Optional[bool] = None
    """DDP's find_unused_parameters (null: torch's default, false)."""
    ddp_bucket_cap_mb: Optional[int] = None
    """DDP gradient bucket size in MiB (null: torch's default)."""
    ddp_broadcast_buffers: Optional[bool] = None
    """DDP's broadcast_buffers (null: torch's default)."""
    ddp_static_graph: Optional[bool] = None
    """DDP's static_graph (null: torch's default)."""

    # ----- performance -----
    logps_chunk_size: int = 1024
    """Tokens per chunk of the LM head when computing log-probs (the full-vocab logits are never all in memory)."""
    padding_free: bool = False
    """Pack the examples of a micro-batch (DPO: each pair's chosen and rejected) into one row without padding
    (per-sequence positions, attention kept inside each sequence); the same log-probs as the padded path, fewer
    wasted tokens."""
    token_budget: Optional[int] = None
    """With `padding_free`: packed tokens per micro-batch on each process. An optimizer step still covers
    per_device_train_batch_size x gradient_accumulation_steps x processes examples (the same ones as without it, so
    the same numbers); they are split over the processes by token count and each process packs its share into as
    few micro-batches of at most this many tokens as fit, instead of a fixed count per micro-batch (short examples
    fill a budget, long ones do not run out of memory). null: per_device_train_batch_size examples per micro-batch."""

    def validate(self) -> None:
        """Check values and their combinations; raise ConfigError with one line naming the field."""
        if self.bf16 is None:
            # TRL's rule for bf16 left unset (or null): bf16 unless fp16, where the device has it.
            import torch

            self.bf16 = (not self.fp16 and not self.use_cpu and torch.cuda.is_available()
                         and torch.cuda.is_bf16_supported())
        if self.token_budget is not None:
            if not self.padding_free:
                raise ConfigError("token_budget needs padding_free=true (it counts packed tokens)")
            if self.token_budget < 1:
                raise ConfigError(f"token_budget must be >= 1 or null (got {self.token_budget})")
        for name in ("model_name_or_path", "tokenizer_name_or_path", "ref_model_name_or_path"):
            # A local model is recorded by its absolute path, so that a run directory names the model it started
            # from (`dpokit eval`'s default reference) wherever it is read from; hub ids stay as they are.
            value = getattr(self, name, None)
            if isinstance(value, str) and value and Path(value).expanduser().exists():
                setattr(self, name, str(Path(value).expanduser().resolve()))
        _check_choice(self, "truncation_mode", ("keep_start", "keep_end"))
        _check_choice(self, "on_bad_rows", ("error", "skip"))
        _check_choice(self, "optim", OPTIMIZERS)
        _check_choice(self, "dtype", ("float32", "bfloat16", "float16", "auto"))
        _check_choice(self, "logging_strategy", ("steps", "epoch", "no"))
        _check_choice(self, "save_strategy", ("steps", "epoch", "no"))
        _check_choice(self, "log_level", ("passive", "debug", "info", "warning", "error", "critical"))
        if self.eval_strategy is not None:
            _check_choice(self, "eval_strategy", ("steps", "epoch", "no"))
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logps_chunk_size", "ddp_timeout"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 (got {getattr(self, name)})")
        for name in ("logging_steps", "eval_steps", "save_steps", "warmup_steps"):
            value = getattr(self, name)
            zero_ok = name in ("save_steps", "warmup_steps")
            if value is None or 0 < value < 1:
                continue
            if not (float(value).is_integer() and (value >= 1 or (zero_ok and value == 0))):
                raise ConfigError(f"{name} must be an integer >= {0 if zero_ok else 1} or a fraction of the run's "
                                  f"steps in (0, 1) (got {value})")
        for name in ("max_length", "max_prompt_length", "max_completion_length", "save_total_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1 or null (got {value})")
        if self.learning_rate < 0:
            raise ConfigError(f"learning_rate must be >= 0 (got {self.learning_rate})")
        if not 0 <= self.warmup_ratio <= 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1] (got {self.warmup_ratio})")
        _check_choice(self, "on_nonfinite", ("stop", "skip"))
        if self.max_nonfinite_steps < 0:
            raise ConfigError(f"max_nonfinite_steps must be >= 0 (got {self.max_nonfinite_steps})")
        if self.resume_from_checkpoint is not None and self.overwrite_output_dir:
            raise ConfigError("resume_from_checkpoint and overwrite_output_dir are both set; choose one")
        if self.bf16 and self.fp16:
            raise ConfigError("bf16 and fp16 are both set; choose one")
        if self.use_cpu and (self.fp16 or self.tf32):
            raise ConfigError(f"use_cpu is set with {'fp16' if self.fp16 else 'tf32'}, which needs a CUDA GPU")
        if self.torch_compile and self.torch_compile_backend:
            import torch._dynamo

            backends = torch._dynamo.list_backends(exclude_tags=())
            if self.torch_compile_backend not in backends:
                raise ConfigError(f"torch_compile_backend: unknown {self.torch_compile_backend!r}"
                                  f"{_closest(self.torch_compile_backend, backends)}; valid: {', '.join(backends)}")
        if self.dataset_name and self.train_file:
            raise ConfigError("train_file and dataset_name are both set; choose one data source")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ConfigError("set num_train_epochs > 0 or max_steps > 0")
        sinks = self._sinks
        for sink in sinks:
            if sink not in REPORT_SINKS:
                raise ConfigError(f"report_to: unknown sink {sink!r}; valid: {', '.join(REPORT_SINKS)}")
        if "wandb" in sinks and importlib.util.find_spec("wandb") is None:
            raise ConfigError("report_to: wandb needs the wandb package (pip install wandb)")
        from transformers.trainer_utils import SchedulerType

        valid = [s.value for s in SchedulerType]
        if self.lr_scheduler_type not in valid:
            raise ConfigError(f"lr_scheduler_type: unknown {self.lr_scheduler_type!r}{_closest(self.lr_scheduler_type, valid)}")

    @property
    def _sinks(self) -> list:
        return [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)

    @property
    def report_to_tensorboard(self) -> bool:
        return "tensorboard" in self._sinks or "all" in self._sinks

    @property
    def report_to_wandb(self) -> bool:
        return "wandb" in self._sinks or ("all" in self._sinks and importlib.util.find_spec("wandb") is not None)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML (loadable again with `--config`)."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on prompt/completion, messages or text rows."""

    learning_rate: float = 2e-5
    """Peak learning rate of AdamW."""
    completion_only_loss: bool = True
    """Train on completion tokens only (the prompt is context); False trains on every token but the first. In a
    `messages` row the completion is the final assistant turn: earlier assistant turns are context (counted at load
    time), unless this is False."""


@dataclass
class DPOConfig(TrainConfig):
    """Preference optimisation (DPO and its family) on prompt/chosen/rejected pairs."""

    pair_strategy: str = "best_vs_worst"
    """How scored rows (several responses with scores) become pairs: best_vs_worst, best_vs_rest or all_pairs."""
    min_score_gap: float = 0.0
    """Scored rows: a pair needs chosen score - rejected score >= this (ties never become pairs)."""
    share_prompt: bool = False
    """With `padding_free`: one sequence prompt+chosen+rejected per pair, the prompt computed once (rejected never
    attends to chosen and its positions restart after the prompt)."""
    ref_model_name_or_path: Optional[str] = None
    """A separate reference model; default: a frozen copy of the starting policy (adapters off under LoRA)."""
    beta: float = 0.1
    """Inverse temperature of the implicit reward beta * log(pi/pi_ref); higher keeps the policy closer to the reference."""
    loss_type: Union[str, list] = "sigmoid"
    """Preference loss name (see the loss table in docs/losses.md), or a list of names weighted by `loss_weights`."""
    loss_weights: Optional[list] = None
    """Weights of the losses when `loss_type` is a list (default: all 1)."""
    label_smoothing: float = 0.0
    """Probability that a label is flipped (cDPO for `sigmoid`, rDPO for `robust`)."""
    reference_free: bool = False
    """Use a uniform reference (log pi_ref = 0): no reference model is loaded or run."""
    precompute_ref_log_probs: bool = False
    """Run the reference once over the data before training, cache its log-probs on disk and free it."""
    precompute_ref_batch_size: Optional[int] = None
    """Pairs per batch of that precomputing pass (default: `per_device_eval_batch_size`)."""
    rpo_alpha: Optional[float] = None
    """Add rpo_alpha x the chosen completions' per-token NLL to the loss (RPO, arXiv 2404.19733)."""
    simpo_gamma: float = 0.5
    """SimPO target reward margin gamma."""
    discopop_tau: float = 0.05
    """DiscoPOP temperature tau."""
    f_divergence_type: str = "reverse_kl"
    """f-divergence of the reference regulariser: reverse_kl, forward_kl, js_divergence or alpha_divergence."""
    f_alpha_divergence_coef: float = 0.5
    """alpha of the alpha-divergence, TRL's convention: f(u) = (u^(alpha-1) - 1) / (alpha - 1) (alpha -> 1 is reverse KL)."""
    use_weighting: bool = False
    """Weight each pair by its policy likelihood (WPO, arXiv 2406.11827)."""
    ld_alpha: Optional[float] = None
    """LD-DPO: weight of the log-probs beyond the shorter completion's length (arXiv 2409.06411)."""

    def validate(self) -> None:
        super().validate()
        from dpokit import losses

        names = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        if not names:
            raise ConfigError("loss_type is empty")
        for name in names:
            if name not in losses.LOSS_TYPES:
                raise ConfigError(f"loss_type: unknown {name!r}{_closest(name, losses.LOSS_TYPES)}; "
                                  f"valid: {', '.join(losses.LOSS_TYPES)}")
        if self.loss_weights is not None and len(self.loss_weights) != len(names):
            raise ConfigError(f"loss_weights has {len(self.loss_weights)} values for {len(names)} loss types")
        if self.precompute_ref_batch_size is not None and self.precompute_ref_batch_size < 1:
            raise ConfigError(f"precompute_ref_batch_size must be >= 1 or null (got {self.precompute_ref_batch_size})")
        if self.share_prompt and not self.padding_free:
            raise ConfigError("share_prompt needs padding_free=true")
        _check_choice(self, "pair_strategy", ("best_vs_worst", "best_vs_rest", "all_pairs"))
        if self.min_score_gap < 0:
            raise ConfigError(f"min_score_gap must be >= 0 (got {self.min_score_gap})")
        _check_choice(self, "f_divergence_type", ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"))
        if self.beta <= 0:
            raise ConfigError(f"beta must be > 0 (got {self.beta})")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5) (got {self.label_smoothing})")
        spec = self.loss_spec()
        if not spec.needs_reference:
            if self.precompute_ref_log_probs:
                raise ConfigError("precompute_ref_log_probs is set but the loss "
                                  f"{self.loss_type!r} uses no reference model (or reference_free is set)")
            if self.ref_model_name_or_path:
                raise ConfigError("ref_model_name_or_path is set but the loss "
                                  f"{self.loss_type!r} uses no reference model (or reference_free is set)")

    def loss_params(self) -> dict:
        """The keyword arguments `dpokit.losses.preference_loss` takes from this config."""
        return dict(beta=self.beta, loss_weights=self.loss_weights, label_smoothing=self.label_smoothing,
                    reference_free=self.reference_free, rpo_alpha=self.rpo_alpha, simpo_gamma=self.simpo_gamma,
                    discopop_tau=self.discopop_tau, f_divergence_type=self.f_divergence_type,
                    f_alpha_divergence_coef=self.f_alpha_divergence_coef, use_weighting=self.use_weighting)

    def loss_spec(self):
        from dpokit import losses

        return losses.loss_spec(self.loss_type, **self.loss_params())


OPTIMIZERS = ("adamw_torch_fused", "adamw_torch")


def steps_from(value: Optional[Union[int, float]], total_steps: int) -> Optional[int]:
    """An interval field (`logging_steps`, `eval_steps`, `save_steps`, `warmup_steps`) in optimizer steps: a float in
    (0, 1) is that fraction of the run's `total_steps`, rounded up, as transformers reads it."""
    if value is None:
        return None
    return max(1, math.ceil(value * total_steps)) if 0 < value < 1 else int(value)


# --------------------------------------------------------------------------------------------------------------------
# TRL / transformers keys without a dpokit field
#
# A TRL config must port without edits, and nothing it asks for may be dropped silently. So every other key of TRL's
# DPOConfig (TrainingArguments included) and of its scripts' ModelConfig / ScriptArguments is listed here: ANY keys
# change nothing in dpokit whatever their value (they tune machinery dpokit does not have: dataloader workers, hub
# uploads, integrations); the others are accepted at TRL's default, which asks for nothing dpokit does differently,
# and any other value is refused with the reason.

ANY = object()

_INPUT = "dpokit tokenizes in the main process and builds batches in memory, without dataloader workers"
_EVAL = "dpokit's evaluation sums per-pair metrics batch by batch; no predictions are gathered"
_ENGINE = ("the engine (DDP, FSDP, DeepSpeed) comes from the launch: accelerate launch --config_file "
           "examples/accelerate/{ddp,fsdp,zero2,zero3}.yaml (see docs/scaling-out.md)")
_HUB = "it acts only with push_to_hub, and dpokit does not upload"
_LOG = "only the first process prints"

FOREIGN_KEYS: dict[str, tuple[Any, str]] = {
    # for scripts, not trainers (in transformers too)
    "do_train": (ANY, "it is for scripts; the trainer does not read it"),
    "do_eval": (ANY, "it is for scripts; the trainer does not read it"),
    "do_predict": (ANY, "it is for scripts; the trainer does not read it"),
    "local_rank": (ANY, "dpokit reads the launch from the environment (torchrun, accelerate launch)"),
    # input pipeline
    "dataset_num_proc": (ANY, _INPUT),
    "dataloader_num_workers": (ANY, _INPUT),
    "dataloader_pin_memory": (ANY, _INPUT),
    "dataloader_persistent_workers": (ANY, _INPUT),
    "dataloader_prefetch_factor": (ANY, _INPUT),
    "dataloader_multiprocessing_context": (ANY, _INPUT),
    "dataloader_in_order": (ANY, _INPUT),
    "remove_unused_columns": (ANY, "dpokit reads only the columns its data format needs"),
    "ignore_bias_buffers": (ANY, "dpokit's DDP wrapper does not broadcast buffers of a frozen kind"),
    "length_column_name": (ANY, "it acts only with train_sampling_strategy: group_by_length"),
    "label_names": (ANY, _EVAL),
    "dataset_streaming": (False, "dpokit reads the whole data set first, so every row is checked and counted"),
    "dataloader_drop_last": (False, "every pair is trained on; a smaller last batch is weighted exactly"),
    "train_sampling_strategy": ("random", "pairs are drawn in a seeded random order (data_seed); for batches of "
                                          "similar length use padding_free with token_budget"),
    "pad_to_multiple_of": ("auto", "batches are padded to their longest sequence, or not at all with padding_free"),
    # evaluation
    "eval_accumulation_steps": (ANY, _EVAL),
    "eval_do_concat_batches": (ANY, _EVAL),
    "eval_use_gather_object": (ANY, _EVAL),
    "include_for_metrics": ([], "dpokit's evaluation metrics are fixed (dpokit eval computes more)"),
    "batch_eval_metrics": (False, _EVAL),
    "prediction_loss_only": (False, _EVAL),
    "eval_delay": (0, "evaluation follows eval_strategy and eval_steps"),
    "bf16_full_eval": (False, "evaluation runs in the training precision (bf16/fp16 autocast)"),
    "fp16_full_eval": (False, "evaluation runs in the training precision (bf16/fp16 autocast)"),
    "load_best_model_at_end": (False, "not implemented: the final model is the last step's"),
    "metric_for_best_model": (ANY, "it acts only with load_best_model_at_end, which dpokit does not do"),
    "greater_is_better": (ANY, "it acts only with load_best_model_at_end, which dpokit does not do"),
    # logging and integrations
    "log_on_each_node": (ANY, _LOG),
    "log_level_replica": (ANY, _LOG),
    "logging_nan_inf_filter": (ANY, "a non-finite loss never reaches the log: on_nonfinite stops or skips the step"),
    "skip_memory_metrics": (ANY, "dpokit logs no memory metrics"),
    "include_num_input_tokens_seen": (ANY, "dpokit logs tokens_per_second instead"),
    "project": (ANY, "it names a trackio project; report_to knows none, tensorboard and wandb"),
    "trackio_space_id": (ANY, "it acts only with report_to: trackio, which dpokit does not have"),
    "trackio_bucket_id": (ANY, "it acts only with report_to: trackio, which dpokit does not have"),
    "trackio_static_space_id": (ANY, "it acts only with report_to: trackio, which dpokit does not have"),
    "logging_dir": (None, "TensorBoard events are written under output_dir"),
    # saving and the hub
    "push_to_hub": (False, "dpokit does not upload: the final model is a Hugging Face directory in output_dir "
                           "(upload it with `hf upload`)"),
    "hub_model_id": (ANY, _HUB),
    "hub_token": (ANY, _HUB),
    "hub_private_repo": (ANY, _HUB),
    "hub_strategy": (ANY, _HUB),
    "hub_always_push": (ANY, _HUB),
    "hub_revision": (ANY, _HUB),
    "save_only_model": (False, "a checkpoint always holds optimizer, scheduler and RNG state so a resume is exact; "
                               "the final model in output_dir holds the weights only"),
    "save_on_each_node": (False, "only the first process writes"),
    "enable_jit_checkpoint": (False, "checkpoints are written every save_steps, atomically; a killed run resumes "
                                     "from the last one"),
    "ignore_data_skip": (False, "a resume always continues at the exact next batch"),
    "restore_callback_states_from_checkpoint": (False, "dpokit has no callbacks"),
    # optimisation and model
    "optim_args": (None, "the optimizer takes adam_beta1, adam_beta2, adam_epsilon and weight_decay only"),
    "optim_target_modules": (ANY, "it acts only with GaLore/APOLLO optimizers, which dpokit does not have"),
    "label_smoothing_factor": (0.0, "that is transformers' cross-entropy smoothing; DPO's label noise is "
                                    "label_smoothing (cDPO)"),
    "average_tokens_across_devices": (True, "dpokit's loss is always the exact mean over the global batch"),
    "auto_find_batch_size": (False, "an out-of-memory error names the setting to lower instead"),
    "neftune_noise_alpha": (None, "NEFTune embedding noise is not implemented"),
    "use_liger_kernel": (False, "dpokit does not use Liger kernels; its LM head never holds full-vocabulary logits "
                                "anyway (logps_chunk_size)"),
    "liger_kernel_config": (ANY, "it acts only with use_liger_kernel"),
    "activation_offloading": (False, "not implemented; use gradient_checkpointing"),
    "torch_empty_cache_steps": (ANY, "emptying the allocator's cache does not lower the peak a step needs"),
    "use_cache": (ANY, "training forwards never use the KV cache"),
    "router_aux_loss_coef": (None, "the load-balancing loss of mixture-of-experts models is not added"),
    "sync_ref_model": (False, "TR-DPO reference updates are not implemented; the reference stays fixed"),
    "ref_model_mixup_alpha": (ANY, "it acts only with sync_ref_model"),
    "ref_model_sync_steps": (ANY, "it acts only with sync_ref_model"),
    "evaluation_strategy": (None, "transformers calls it eval_strategy: rename the key"),
    "load_in_8bit": (False, "quantized (bitsandbytes) training is not supported"),
    "load_in_4bit": (False, "quantized (bitsandbytes) training is not supported"),
    "bnb_4bit_quant_type": (ANY, "it acts only with load_in_4bit"),
    "use_bnb_nested_quant": (ANY, "it acts only with load_in_4bit"),
    "bnb_4bit_quant_storage": (ANY, "it acts only with load_in_4bit"),
    "lora_task_type": ("CAUSAL_LM", "dpokit trains causal LMs"),
    "lora_target_parameters": (None, "LoRA on bare parameters (MoE experts) is not supported; use "
                                     "lora_target_modules"),
    # TRL's SFTConfig (keys that DPOConfig has as fields are read as fields there)
    "dataset_text_field": ("text", "dpokit detects the text column; rename yours with column_map: {your_column: text}"),
    "dataset_kwargs": (None, "dpokit reads the data set itself"),
    "shuffle_dataset": (ANY, "pairs are always drawn in a seeded random order (data_seed)"),
    "packing": (False, "TRL's packing of several examples into max_length rows is not implemented; padding_free=true "
                       "packs each micro-batch into one row without padding (token_budget: by token count)"),
    "packing_strategy": (ANY, "it acts only with packing"),
    "eval_packing": (ANY, "it acts only with packing"),
    "assistant_only_loss": (False, "a messages row trains its final assistant turn (completion_only_loss) or, with "
                                   "completion_only_loss=false, the whole conversation; a loss on every assistant "
                                   "turn is not supported"),
    "loss_type": ("nll", "dpokit's SFT loss is the negative log-likelihood"),
    # engines
    "fsdp": (None, _ENGINE),
    "fsdp_config": (None, _ENGINE),
    "deepspeed": (None, _ENGINE),
    "accelerator_config": (None, _ENGINE),
    "parallelism_config": (None, _ENGINE),
    "debug": ("", "use dpokit's --debug for tracebacks"),
}


# transformers' newer names for the same settings (its own aliases): read into the dpokit field.
ALIASES = {"activation_checkpointing": "gradient_checkpointing",
           "activation_checkpointing_kwargs": "gradient_checkpointing_kwargs",
           "torch_dtype": "dtype",  # transformers v5's new name
           "chat_template_path": "chat_template"}  # dpokit's chat_template also takes a file


def _at_default(value: Any, default: Any) -> bool:
    """Whether a value read from YAML or the command line is TRL's default `default` (None, "", [] and "auto" count
    as one another's default where TRL means "nothing asked for")."""
    nothing = (None, "", "none", "null", "auto", "[]")
    if isinstance(value, str) and value.strip().lower() in nothing:
        value = None
    if isinstance(value, (list, dict)) and not value:
        value = None
    if default in (None, "", "auto") or default == []:
        return value is None or value == default
    if isinstance(default, bool):
        try:
            return _coerce("", value, bool) is default
        except ConfigError:
            return False
    if isinstance(default, (int, float)):
        try:
            return float(value) == float(default)
        except (TypeError, ValueError):
            return False
    return str(value) == str(default)


# --------------------------------------------------------------------------------------------------------------------
# Building a config from YAML and key=value overrides


def field_docs(cls: type) -> dict[str, str]:
    """The documentation string under each field, from the source of `cls` and its bases (subclass wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _closest(name: str, valid) -> str:
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _check_choice(cfg, name: str, choices) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(choices)}{_closest(str(value), choices)}")


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise ConfigError naming the field."""
    annotation = _annotation(annotation)
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        # Order matters for text from the command line: "3" is an int before a str, "[a, b]" a list before a str,
        # but a plain "ipo" stays a str rather than becoming the one-element list a comma split would make.
        flow = isinstance(value, str) and value.strip()[:1] in ("[", "{")

        def rank(a):
            if a in (list, dict) or typing.get_origin(a) in (list, dict):
                return 1 if flow else 3
            return 2 if a is str else 0

        for arg in sorted((a for a in args if a is not type(None)), key=rank):
            try:
                return _coerce(name, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{name}: cannot read {value!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value))
        except ValueError:
            raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return str(value)
    if annotation in (list, dict) or origin in (list, dict):
        target = origin or annotation
        if isinstance(value, str):
            # Command line: YAML/JSON flow syntax ("[a, b]", "{a: b}") or, for lists, comma-separated values.
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError:
                parsed = value
            if target is list and not isinstance(parsed, list):
                parsed = [v.strip() for v in value.split(",") if v.strip()]
            value = parsed
        if not isinstance(value, target):
            raise ConfigError(f"{name}: expected a {target.__name__}, got {value!r}")
        return value
    return value


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last silently, so a config
    with two `learning_rate:` lines would train with one of them and nobody would be told which."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def build_config(cls: type, config_file: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """Defaults < YAML file < overrides. Unknown keys name the closest valid key. The result is validated."""
    values: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a directory; give the YAML file in it")
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(loaded).__name__}")
        values.update(loaded)
    values.update(overrides or {})
    for alias, name in ALIASES.items():
        if alias in values:
            value = values.pop(alias)
            if value is None:
                continue
            if name in values and values[name] is not None and values[name] != value:
                raise ConfigError(f"{alias} ({value!r}) and {name} ({values[name]!r}) disagree; they are one setting")
            values[name] = value
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs, inert = {}, {}
    for key, value in values.items():
        where = f" in {config_file}" if config_file and key not in (overrides or {}) else ""
        if key in fields and _is_null(value) and type(None) not in typing.get_args(_annotation(fields[key].type)):
            # TRL's "decide for me" (completion_only_loss: null): dpokit's default, which is TRL's decision for
            # its data. (bf16: null is the field's own default, resolved by `validate`.)
            continue
        if key in fields:
            kwargs[key] = _coerce(key, value, fields[key].type)
        elif key in FOREIGN_KEYS:
            default, reason = FOREIGN_KEYS[key]
            if default is not ANY and not _at_default(value, default):
                raise ConfigError(f"{key}: {value!r}{where} is not supported: {reason}")
            inert[key] = reason
        else:
            # dpokit's own keys first: a typo of one (lora_rank) should not be read as a TRL-only key (local_rank).
            raise ConfigError(f"unknown config key {key!r}{where}{_closest(key, fields) or _closest(key, FOREIGN_KEYS)}")
    cfg = cls(**kwargs)
    cfg.validate()
    cfg.inert_keys = inert  # TRL keys that change nothing here; the trainer names them once
    return cfg


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null"))


def config_from_args(cls: type, args: Any) -> TrainConfig:
    """Turn the `args=` of a trainer (None, a dict, a config of this class, or a TRL / transformers config object
    such as `trl.DPOConfig`) into a validated config."""
    if args is None:
        cfg = cls()
    elif isinstance(args, dict):
        return build_config(cls, overrides=args)
    elif isinstance(args, cls):
        cfg = args
        _check_types(cfg)
    elif dataclasses.is_dataclass(args) and callable(getattr(args, "to_dict", None)):
        return build_config(cls, overrides=_ported(cls, args))
    else:
        raise ConfigError(f"args must be a {cls.__name__}, a dict or a TRL config, got {type(args).__name__}")
    cfg.validate()
    return cfg


def _check_types(cfg: TrainConfig) -> None:
    """A config made in Python (`DPOConfig(beta="0.1")`) is not read from text, so nothing converts its values:
    a value of the wrong type is an error naming the field, not a TypeError deep in validation or training."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        converted = _coerce(f.name, value, f.type)
        if isinstance(value, str) and not isinstance(converted, str):
            raise ConfigError(f"{f.name}: expected {type(converted).__name__}, got the string {value!r}")


def _ported(cls: type, args: Any) -> dict:
    """The keys of a TRL / transformers config object (e.g. `trl.DPOConfig`) as dpokit overrides: every key that is a
    dpokit field, with TRL's value, and every other key whose value differs from a default object of the same class,
    so that it is checked against FOREIGN_KEYS."""
    def as_dict(obj) -> dict:
        # to_dict() turns enums into their values, but also hides every `*_token` field as "<KEY>" (for hub
        # tokens); TRL's `pad_token` is a real setting, so those fields are read as they are.
        d = obj.to_dict()
        return {k: getattr(obj, k, v) if k.endswith("_token") else v for k, v in d.items()}

    values = as_dict(args)
    fields = {f.name for f in dataclasses.fields(cls)}
    try:
        # The same device flags, since transformers checks them against the machine when the object is made.
        base = as_dict(type(args)(**{k: getattr(args, k) for k in ("use_cpu", "bf16", "fp16") if hasattr(args, k)}))
    except Exception:  # noqa: BLE001 - a class that cannot be made bare: every foreign key is checked as given
        base = {}
    return {key: value for key, value in values.items()
            if key in fields or key not in base or value != base[key]}


def _annotation(annotation: Any) -> Any:
    if isinstance(annotation, str):
        return eval(annotation, vars(typing), {"Optional": Optional, "Union": Union})  # noqa: S307 (own code)
    return annotation


def parse_overrides(tokens: list[str]) -> dict[str, str]:
    """`key=value` and `--key value` / `--key=value` tokens to a dict (values stay strings until coerced)."""
    out: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("--"):
            key = tok[2:]
            if "=" in key:
                key, value = key.split("=", 1)
            elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                i += 1
                value = tokens[i]
            else:
                value = "true"  # a bare flag: --bf16
        elif "=" in tok:
            key, value = tok.split("=", 1)
        else:
            raise ConfigError(f"cannot read argument {tok!r}: use key=value or --key value")
        out[key.replace("-", "_")] = value
        i += 1
    return out

