"""Run configuration: one dataclass per command, each field documented once (the string under it).

Field names are TRL's `DPOConfig` / transformers' `TrainingArguments` names wherever the meaning is the same, so a
TRL config ports without renames (TRL's keys that have no field here are in `dpokit.compat`). A config comes from
defaults, then a YAML file of flat keys, then `key=value` overrides (CLI); `DPOConfig(...)` in Python reads its
keywords as those keys are read (`read_keys`), so the two accept the same keys with the same errors.

A config is checked once, when it is made (`__post_init__`, as litgpt's configs are), so before any model loads:
each field's type and the range or choices declared next to it (`field(metadata=...)`, read by `check_settings`),
then the combinations of fields (`_check`). The loss settings are `LossParams` (`dpokit.losses.LossParams`), which
DPOConfig inherits. The docstrings under the fields are read back (with `ast`) for `dpokit <cmd> --help`, so the
documentation cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from dpokit import compat, plugins, settings
from dpokit.errors import ConfigError
from dpokit.fileio import read_yaml
from dpokit.settings import annotation_of, closest, coerce, field_docs, is_null, mark_checked  # noqa: F401

REPORT_SINKS = ("none", "tensorboard", "wandb", "all")
OPTIMIZERS = ("adamw_torch_fused", "adamw_torch")
PAIR_STRATEGIES = ("best_vs_worst", "best_vs_rest", "all_pairs")
_STRATEGIES = ("steps", "epoch", "no")
_LOG_LEVELS = ("passive", "debug", "info", "warning", "error", "critical")
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


class _ReadsKeys(type):
    """The configs' metaclass: ``DPOConfig(...)`` and ``SFTConfig(...)`` read their keyword arguments as a YAML file's
    keys are read (`read_keys`: transformers' aliases, TRL's keys without a dpokit field, TRL's removed keys, "did
    you mean" for the rest), so that a TRL script's config ports to Python unchanged, as it does to YAML. A metaclass,
    because the dataclass machinery writes ``__init__`` itself, for each subclass."""

    def __call__(cls, *args, **kwargs):
        kwargs, inert = read_keys(cls, kwargs)
        cfg = super().__call__(*args, **kwargs)
        cfg.inert_keys = inert  # TRL keys that change nothing here; the trainer names them once
        return cfg


@dataclass
class TrainConfig(metaclass=_ReadsKeys):
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
    dtype: str = field(default="float32", metadata={"choices": ("float32", "bfloat16", "float16", "auto")})
    """Dtype the weights are loaded in: float32 (master weights for bf16/fp16 autocast), bfloat16, float16 or auto
    (the checkpoint's own). A `dtype` in `model_init_kwargs` wins."""
    attn_implementation: Optional[str] = None
    """Attention kernel of the loaded model, e.g. sdpa, eager, flash_attention_2 (default: transformers' choice).
    With `padding_free`, packed rows use dpokit's exact variable-length attention whatever this says."""
    trust_remote_code: bool = False
    """Allow model code from the model's repository to run. Off unless asked: it executes code you did not write."""
    train_file: Optional[str] = None
    """Training data: .jsonl/.json/.csv/.tsv/.parquet/.arrow (optionally .gz) or a `save_to_disk` directory."""
    eval_file: Optional[Union[str, list, dict]] = None
    """Held-out data in the same formats; evaluated as `eval_strategy` says (by default at the end of training). Several
    sets: a mapping {name: file} or a list of files (named by file name), each logged as eval_<name>_loss, ...
    (metrics.jsonl: eval_<name>/loss), as transformers evaluates a dict `eval_dataset`."""
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
    on_bad_rows: str = field(default="error", metadata={"choices": ("error", "skip")})
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
    max_length: Optional[int] = field(default=1024, metadata={"range": "[1, inf)"})
    """Longest prompt+completion in tokens; longer rows are cut per `truncation_mode`, and counted."""
    max_prompt_length: Optional[int] = field(default=None, metadata={"range": "[1, inf)"})
    """Longest prompt in tokens; longer prompts lose tokens from the left (their start)."""
    max_completion_length: Optional[int] = field(default=None, metadata={"range": "[1, inf)"})
    """Longest completion in tokens; longer completions lose tokens from the right (their end)."""
    truncation_mode: str = field(default="keep_start", metadata={"choices": ("keep_start", "keep_end")})
    """How `max_length` cuts: `keep_start` drops the end of the sequence, `keep_end` drops the start of the prompt.
    A row whose completion would lose every token is dropped and counted, never trained on."""

    # ----- optimisation -----
    output_dir: str = "runs/dpokit"
    """Where the final model (HF format), the resolved config, metrics.jsonl and checkpoints are written."""
    overwrite_output_dir: bool = False
    """Allow writing into an `output_dir` that already holds a finished run."""
    per_device_train_batch_size: int = field(default=8, metadata={"range": "[1, inf)"})
    """Training examples (pairs for DPO) per device per micro-batch."""
    per_device_eval_batch_size: int = field(default=8, metadata={"range": "[1, inf)"})
    """Evaluation examples per device per batch."""
    gradient_accumulation_steps: int = field(default=1, metadata={"range": "[1, inf)"})
    """Micro-batches summed before each optimizer step."""
    learning_rate: float = field(default=1e-6, metadata={"range": "[0, 1]"})
    """Peak learning rate of AdamW, at most 1 (an AdamW step moves each weight by about the learning rate)."""
    optim: str = field(default="adamw_torch_fused", metadata={"choices": OPTIMIZERS})
    """Optimizer: adamw_torch_fused (torch's fused AdamW where the device has it: CUDA) or adamw_torch (its
    multi-tensor AdamW). The same update either way; other transformers optimizer names are refused."""
    lr_scheduler_type: str = "linear"
    """A transformers scheduler name: linear, cosine, constant, constant_with_warmup, cosine_with_min_lr, ..."""
    lr_scheduler_kwargs: Optional[dict] = None
    """Extra arguments of the scheduler, e.g. {min_lr_rate: 0.1} for cosine_with_min_lr, {power: 2.0} for polynomial."""
    warmup_ratio: float = field(default=0.0, metadata={"range": "[0, 1]"})
    """Fraction of the optimizer steps spent warming up linearly (ignored when `warmup_steps` > 0)."""
    warmup_steps: Union[int, float] = field(default=0, metadata={"range": "[0, inf)", "fractions": True})
    """Optimizer steps of linear warmup: an integer, or a float in (0, 1) for that fraction of all steps (as in
    transformers v5); overrides `warmup_ratio` when > 0."""
    weight_decay: float = field(default=0.0, metadata={"range": "[0, inf)"})
    """AdamW weight decay (not applied to biases and norm weights)."""
    adam_beta1: float = field(default=0.9, metadata={"range": "[0, 1)"})
    """AdamW beta1."""
    adam_beta2: float = field(default=0.999, metadata={"range": "[0, 1)"})
    """AdamW beta2."""
    adam_epsilon: float = field(default=1e-8, metadata={"range": "(0, inf)"})
    """AdamW epsilon."""
    max_grad_norm: float = field(default=1.0, metadata={"range": "[0, inf)"})
    """Clip the global gradient norm to this value (0 disables clipping)."""
    num_train_epochs: float = field(default=3.0, metadata={"range": "[0, inf)"})
    """Passes over the training data (fractions allowed); ignored when `max_steps` > 0."""
    max_steps: int = field(default=-1, metadata={"range": "[-1, inf)"})
    """Total optimizer steps; > 0 overrides `num_train_epochs`."""
    seed: int = field(default=42, metadata={"range": "[0, 4294967295]"})
    """Seed for python, numpy and torch (weights of new heads, dropout) and, unless `data_seed` is set, data order;
    in [0, 2^32 - 1], numpy's range."""
    data_seed: Optional[int] = field(default=None, metadata={"range": "[0, 4294967295]"})
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
    logging_strategy: str = field(default="steps", metadata={"choices": _STRATEGIES})
    """When averaged training metrics are logged: `steps` (every `logging_steps`), `epoch` (at each epoch's end) or
    `no`. The last step is always logged."""
    logging_steps: Union[int, float] = field(default=10, metadata={"range": "[1, inf)", "fractions": True})
    """Log every this many optimizer steps (a float in (0, 1): that fraction of all steps)."""
    logging_first_step: bool = False
    """Also log the first optimizer step."""
    log_level: str = field(default="passive", metadata={"choices": _LOG_LEVELS})
    """dpokit's notices on stdout, as transformers reads log_level: passive (its default: warning), warning, error,
    critical; info/debug also show routine ones (e.g. a data file's count line when no row was skipped or cut). The
    metrics dicts are printed at every level, as transformers' Trainer prints them."""
    eval_strategy: Optional[str] = field(default=None, metadata={"choices": _STRATEGIES})
    """When to evaluate (with `eval_file` or `dataset_name`'s test split): `steps` (every `eval_steps`, which defaults
    to `logging_steps`, and at the end), `epoch` (at each epoch's end), `no` (never). null: every `eval_steps` if it is
    set, and at the end of training."""
    eval_steps: Optional[Union[int, float]] = field(default=None, metadata={"range": "[1, inf)", "fractions": True})
    """Evaluate every this many optimizer steps (a float in (0, 1): that fraction of all steps)."""
    eval_on_start: bool = False
    """Also evaluate before the first step (the starting model's numbers, as a baseline)."""
    save_strategy: str = field(default="steps", metadata={"choices": _STRATEGIES})
    """When checkpoints are written: `steps` (every `save_steps`), `epoch` (at each epoch's end) or `no`. The final
    model is always written to `output_dir`."""
    save_steps: Union[int, float] = field(default=500, metadata={"range": "[0, inf)", "fractions": True})
    """Write a checkpoint every this many optimizer steps (0: none; a float in (0, 1): that fraction of all steps)."""
    save_total_limit: Optional[int] = field(default=None, metadata={"range": "[1, inf)"})
    """Keep at most this many checkpoints, deleting the oldest once a new one is complete (the best one is kept with
    `load_best_model_at_end`, as transformers keeps it)."""
    load_best_model_at_end: bool = False
    """At the end of training, load the checkpoint whose evaluation scored best on `metric_for_best_model` (so
    `save_model` writes it), as transformers does. Needs evaluation and checkpoints on the same schedule
    (`eval_strategy` = `save_strategy`; with steps, `save_steps` a multiple of `eval_steps`)."""
    metric_for_best_model: Optional[str] = None
    """The evaluation metric that ranks checkpoints (with or without its `eval_` prefix, e.g. `loss`,
    `rewards/accuracies`); default `loss` with `load_best_model_at_end`. `transformers.EarlyStoppingCallback` reads it."""
    greater_is_better: Optional[bool] = None
    """Whether a higher `metric_for_best_model` is better; default: false for a metric ending in `loss`, else true."""
    save_on_sigterm: bool = True
    """On SIGTERM (what SLURM and Kubernetes send before they kill a job) write a checkpoint at the next step boundary,
    then stop (exit code 143), so a pre-empted job loses at most one step; false stops there without one."""
    resume_from_checkpoint: Optional[str] = None
    """Continue a stopped run exactly: `latest` (the newest complete checkpoint in `output_dir`; a fresh start if none
    was written yet) or a `checkpoint-N` directory. The later losses and final weights equal those of a run that was
    never stopped; the config must match the checkpoint's (only output, logging, eval and save settings may change).
    Command line: `--resume` (latest) or `--resume PATH`."""
    on_nonfinite: str = field(default="stop", metadata={"choices": ("stop", "skip")})
    """What a NaN/Inf loss or gradient does, detected before the optimizer step: `stop` (the run ends naming the step
    and the batch's rows; the last checkpoint stays intact) or `skip` (that step makes no update but still counts toward `max_steps` and the schedule; logged as
    `nonfinite_steps`)."""
    max_nonfinite_steps: int = field(default=10, metadata={"range": "[0, inf)"})
    """With `on_nonfinite: skip`, the most steps that may be skipped; one more stops the run as `stop` would."""
    report_to: Union[str, list] = "none"
    """Metric sinks besides metrics.jsonl: `none`, `tensorboard`, `wandb` (Weights & Biases, as transformers logs to
    it: project from WANDB_PROJECT, run name `run_name`, metrics as train/... and eval/...; needs `pip install
    wandb`), a list of them, or `all` (tensorboard, and wandb where installed)."""
    disable_tqdm: bool = False
    """Hide the progress bars (training, evaluation, reference precomputation); each log is then printed as a plain
    dict (transformers' PrinterCallback) instead of above the bar."""
    logging_dir: Optional[str] = None
    """Where TensorBoard event files go (report_to: tensorboard). Default, as transformers: $TENSORBOARD_LOGGING_DIR,
    else output_dir/runs/<date>_<host>; a resumed run goes on writing into the directory it started."""

    # ----- LoRA (peft) -----
    use_peft: bool = False
    """Train LoRA adapters instead of all weights."""
    lora_r: int = field(default=16, metadata={"range": "[1, inf)"})
    """LoRA rank."""
    lora_alpha: int = field(default=32, metadata={"range": "[1, inf)"})
    """LoRA scaling numerator (scale = lora_alpha / lora_r)."""
    lora_dropout: float = field(default=0.05, metadata={"range": "[0, 1)"})
    """Dropout on the LoRA input (kept even with `disable_dropout`, as in TRL, since it regularises the adapter)."""
    lora_target_modules: Optional[Union[str, list]] = None
    """Module names to adapt (list or comma-separated); None means every linear layer but the LM head."""
    lora_modules_to_save: Optional[Union[str, list]] = None
    """Modules trained in full beside the adapters and saved with them (e.g. [lm_head, embed_tokens])."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale by lora_alpha / sqrt(lora_r) (arXiv 2312.03732)."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA, arXiv 2402.09353)."""

    # ----- QLoRA (bitsandbytes), as TRL's ModelConfig has it -----
    load_in_4bit: bool = False
    """QLoRA: load the model's linear layers 4-bit quantized (bitsandbytes) and train LoRA adapters on them. Needs
    use_peft, a CUDA GPU and `pip install bitsandbytes`; one GPU or DDP. The 4-bit weights are computed in `dtype`
    (bfloat16 is the usual choice; float32, the default, is slower), the adapters stay float32."""
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"choices": ("nf4", "fp4")})
    """With load_in_4bit: the 4-bit data type, nf4 (NormalFloat, QLoRA's) or fp4."""
    use_bnb_nested_quant: bool = False
    """With load_in_4bit: quantize the quantization constants too (double quantization, about 0.4 bit less per
    weight)."""
    bnb_4bit_quant_storage: Optional[str] = field(
        default=None, metadata={"choices": ("uint8", "float16", "bfloat16", "float32")})
    """With load_in_4bit: the dtype the packed 4-bit weights are stored in (null: bitsandbytes' uint8)."""

    # ----- processes (DDP) -----
    ddp_backend: Optional[str] = None
    """Process-group backend (nccl, gloo, ...; default: accelerate's choice for the device)."""
    ddp_timeout: int = field(default=1800, metadata={"range": "[1, inf)"})
    """Seconds a collective may wait before the process group gives up."""
    ddp_find_unused_parameters: Optional[bool] = None
    """DDP's find_unused_parameters (null: torch's default, false)."""
    ddp_bucket_cap_mb: Optional[int] = field(default=None, metadata={"range": "[1, inf)"})
    """DDP gradient bucket size in MiB (null: torch's default)."""
    ddp_broadcast_buffers: Optional[bool] = None
    """DDP's broadcast_buffers (null: torch's default)."""
    ddp_static_graph: Optional[bool] = None
    """DDP's static_graph (null: torch's default)."""

    # ----- performance -----
    logps_chunk_size: int = field(default=1024, metadata={"range": "[1, inf)"})
    """Tokens per chunk of the LM head when computing log-probs (the full-vocab logits are never all in memory)."""
    padding_free: bool = False
    """Pack the examples of a micro-batch (DPO: each pair's chosen and rejected) into one row without padding
    (per-sequence positions, attention kept inside each sequence); the same log-probs as the padded path, fewer
    wasted tokens."""
    token_budget: Optional[int] = field(default=None, metadata={"range": "[1, inf)"})
    """With `padding_free`: packed tokens per micro-batch on each process. An optimizer step still covers
    per_device_train_batch_size x gradient_accumulation_steps x processes examples (the same ones as without it, so
    the same numbers); they are split over the processes by token count and each process packs its share into as
    few micro-batches of at most this many tokens as fit, instead of a fixed count per micro-batch (short examples
    fill a budget, long ones do not run out of memory). null: per_device_train_batch_size examples per micro-batch."""

    def __post_init__(self) -> None:
        settings.check_settings(self)

    def _best_model_defaults(self) -> None:
        """transformers' defaults, set when the arguments are made: the best model is the lowest eval loss, and a
        metric ending in `loss` is better lower."""
        if self.load_best_model_at_end and self.metric_for_best_model is None:
            self.metric_for_best_model = "loss"
        if self.greater_is_better is None and self.metric_for_best_model is not None:
            self.greater_is_better = not self.metric_for_best_model.endswith("loss")

    def validate(self) -> None:
        """Check the config again (after fields were changed by hand) and resolve what it leaves to the run."""
        settings.check_settings(self)
        self._resolve()

    def _check(self) -> None:
        """The checks across fields, each a one-line ConfigError naming them (single fields were checked before)."""
        self._best_model_defaults()  # first: the checks below read them (DPOConfig's own __post_init__ comes here)
        if self.token_budget is not None and not self.padding_free:
            raise ConfigError("token_budget needs padding_free=true (it counts packed tokens)")
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
                                  f"{closest(self.torch_compile_backend, backends)}; valid: {', '.join(backends)}")
        attention = self.attn_implementation or (self.model_init_kwargs or {}).get("attn_implementation")
        if isinstance(attention, str) and attention.startswith("flash_attention"):
            # transformers would fail only once the weights are loaded; the kernel needs its package and a GPU.
            package = "flash_attn_3" if attention == "flash_attention_3" else "flash_attn"
            if importlib.util.find_spec(package) is None:
                raise ConfigError(f"attn_implementation: {attention} needs the {package} package (pip install "
                                  f"{package.replace('_', '-')}) and a CUDA GPU; use sdpa (or leave it unset)")
        if "quantization_config" in (self.model_init_kwargs or {}):
            raise ConfigError(f"model_init_kwargs.quantization_config: {compat.QLORA_FIELDS}")
        if self.load_in_4bit:
            self._check_qlora()
        if self.dataset_name and self.train_file:
            raise ConfigError("train_file and dataset_name are both set; choose one data source")
        if self.load_best_model_at_end:
            self._check_best_model()
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
            raise ConfigError(f"lr_scheduler_type: unknown {self.lr_scheduler_type!r}{closest(self.lr_scheduler_type, valid)}")

    def _check_best_model(self) -> None:
        """transformers' rule: the best model is a checkpoint, so every evaluation must be one."""
        evaluation = self.eval_strategy or ("steps" if self.eval_steps else "no")
        if evaluation != self.save_strategy:
            raise ConfigError(f"load_best_model_at_end needs the eval and save strategies to match, but eval_strategy "
                              f"is {evaluation!r} and save_strategy is {self.save_strategy!r}")
        if evaluation == "steps":
            every = self.eval_steps if self.eval_steps is not None else self.logging_steps
            ratio = self.save_steps / every
            if not self.save_steps or abs(ratio - round(ratio)) > 1e-9:
                raise ConfigError(f"load_best_model_at_end needs save_steps to be a round multiple of eval_steps, but "
                                  f"save_steps is {self.save_steps} and eval_steps is {every}")

    def _check_qlora(self) -> None:
        if not self.use_peft:
            raise ConfigError("load_in_4bit (QLoRA) trains LoRA adapters on the quantized model: set use_peft=true")
        import torch

        if self.use_cpu or not torch.cuda.is_available():
            raise ConfigError("load_in_4bit (QLoRA) needs a CUDA GPU (bitsandbytes' 4-bit kernels); "
                              + ("use_cpu is set" if self.use_cpu else "none is available here"))
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("load_in_4bit (QLoRA) needs the bitsandbytes package (pip install bitsandbytes)")

    def _resolve(self) -> None:
        """Settle what a checked config leaves to the run it is given to. Not a check: the values set here are valid
        by construction, so the config stays checked."""
        if self.bf16 is None:
            # TRL's rule for bf16 left unset (or null): bf16 unless fp16, where the device has it.
            import torch

            self.bf16 = (not self.fp16 and not self.use_cpu and torch.cuda.is_available()
                         and torch.cuda.is_bf16_supported())
        self._best_model_defaults()  # fields changed by hand since the config was made
        for name in ("model_name_or_path", "tokenizer_name_or_path", "ref_model_name_or_path"):
            # A local model is recorded by its absolute path, so that a run directory names the model it started
            # from (`dpokit eval`'s default reference) wherever it is read from; hub ids stay as they are.
            value = getattr(self, name, None)
            if isinstance(value, str) and value and Path(value).expanduser().exists():
                setattr(self, name, str(Path(value).expanduser().resolve()))
        mark_checked(self)

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
        from dpokit.fileio import atomic_write_text

        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on prompt/completion, messages or text rows."""

    learning_rate: float = 2e-5
    """Peak learning rate of AdamW, at most 1 (an AdamW step moves each weight by about the learning rate)."""
    completion_only_loss: bool = True
    """Train on completion tokens only (the prompt is context); False trains on every token but the first. In a
    `messages` row the completion is the final assistant turn: earlier assistant turns are context (counted at load
    time), unless this is False."""


@dataclass
class LossParams:
    """The settings of a preference loss, declared once: `DPOConfig` inherits them and `dpokit.losses.build` makes
    the loss of them (`dpokit.losses.LossParams` is this class).

    Each field's general range is declared next to it (``metadata``) and checked, with every other combination of
    them, when the object is made; what a single loss needs beyond that is its ``check`` in the registry
    (`dpokit.losses.register`). A loss function reads these as its ``params`` argument.
    """

    loss_type: Union[str, list] = field(default="sigmoid", metadata={"callables": True})
    """Preference loss name (see the loss table in docs/losses.md; `dpokit dpo --help` lists them), your own loss as
    `module:function` or `path/to/file.py:function`, or a list of these weighted by `loss_weights` (command line:
    `--loss_type sigmoid,sft`)."""
    loss_weights: Optional[list[float]] = field(default=None, metadata={"range": "[0, inf)"})
    """Weights of the losses when `loss_type` is a list (default: all 1)."""
    beta: float = field(default=0.1, metadata={"range": "(0, inf)"})
    """Inverse temperature of the implicit reward beta * log(pi/pi_ref); higher keeps the policy closer to the reference."""
    label_smoothing: float = field(default=0.0, metadata={"range": "[0, 0.5]"})
    """Probability that a label is flipped (cDPO for `sigmoid`, rDPO for `robust`, which needs it below 0.5); EXO's
    target smoothing for `exo_pair`, which needs it above 0."""
    reference_free: bool = False
    """Use a uniform reference (log pi_ref = 0): no reference model is loaded or run."""
    rpo_alpha: Optional[float] = field(default=None, metadata={"range": "[0, inf)"})
    """Add rpo_alpha x the chosen completions' per-token NLL to the loss (RPO, arXiv 2404.19733)."""
    simpo_gamma: float = field(default=0.5, metadata={"range": "(-inf, inf)"})
    """SimPO target reward margin gamma."""
    discopop_tau: float = field(default=0.05, metadata={"range": "(-inf, inf)"})
    """DiscoPOP temperature tau."""
    f_divergence_type: str = field(default="reverse_kl", metadata={"choices": F_DIVERGENCE_TYPES})
    """f-divergence of the reference regulariser: reverse_kl, forward_kl, js_divergence or alpha_divergence."""
    f_alpha_divergence_coef: float = field(default=0.5, metadata={"range": "(-inf, inf)"})
    """alpha of the alpha-divergence, TRL's convention: f(u) = (u^(alpha-1) - 1) / (alpha - 1) (alpha -> 1 is reverse KL)."""
    use_weighting: bool = False
    """Weight each pair by its policy likelihood (WPO, arXiv 2406.11827)."""
    ld_alpha: Optional[float] = field(default=None, metadata={"range": "[0, 1]"})
    """LD-DPO: weight of the log-probs beyond the shorter completion's length (arXiv 2409.06411)."""

    def __post_init__(self) -> None:
        settings.check_settings(self)

    def _check(self) -> None:
        """The checks across fields (the loss names, their weights, each loss's own needs, in `dpokit.losses`), run
        once by `check_settings`; the loss they build is kept for `dpokit.losses.build`."""
        from dpokit import losses  # the losses import torch, which `import dpokit` and `--help` do without

        self._loss = losses.Loss(self)


@dataclass
class DPOConfig(LossParams, TrainConfig):
    """Preference optimisation (DPO and its family) on prompt/chosen/rejected pairs."""

    pair_strategy: str = field(default="best_vs_worst", metadata={"choices": PAIR_STRATEGIES})
    """How scored rows (several responses with scores) become pairs: best_vs_worst, best_vs_rest or all_pairs."""
    min_score_gap: float = field(default=0.0, metadata={"range": "[0, inf)"})
    """Scored rows: a pair needs chosen score - rejected score >= this (ties never become pairs)."""
    share_prompt: bool = False
    """With `padding_free`: one sequence prompt+chosen+rejected per pair, the prompt computed once (rejected never
    attends to chosen and its positions restart after the prompt)."""
    ref_model_name_or_path: Optional[str] = None
    """A separate reference model; default: a frozen copy of the starting policy (adapters off under LoRA)."""
    precompute_ref_log_probs: bool = False
    """Run the reference once over the data before training, cache its log-probs on disk and free it."""
    precompute_ref_batch_size: Optional[int] = field(default=None, metadata={"range": "[1, inf)"})
    """Pairs per batch of that precomputing pass (default: `per_device_eval_batch_size`)."""

    def _resolve(self) -> None:
        # A loss file is recorded by its absolute path, as a local model is: the run's config loads the same code
        # from any directory (`dpokit eval RUN`, --resume).
        names = self.loss_type if isinstance(self.loss_type, list) else [self.loss_type]
        absolute = [plugins.absolute(n) if isinstance(n, str) else n for n in names]
        if absolute != names:
            self.loss_type = absolute if isinstance(self.loss_type, list) else absolute[0]
        TrainConfig._resolve(self)

    def _check(self) -> None:
        TrainConfig._check(self)
        names = self.loss_type if isinstance(self.loss_type, (list, tuple)) else [self.loss_type]
        for name in names:
            if callable(name):
                raise ConfigError(f"loss_type: {getattr(name, '__name__', name)!r} is a function, which a run's "
                                  "config cannot record; register it with dpokit.losses.register and give its name, or give "
                                  "it as module:function")
        LossParams._check(self)
        if self.share_prompt and not self.padding_free:
            raise ConfigError("share_prompt needs padding_free=true")
        if not self._loss.spec.needs_reference:
            if self.precompute_ref_log_probs:
                raise ConfigError("precompute_ref_log_probs is set but the loss "
                                  f"{self.loss_type!r} uses no reference model (or reference_free is set)")
            if self.ref_model_name_or_path:
                raise ConfigError("ref_model_name_or_path is set but the loss "
                                  f"{self.loss_type!r} uses no reference model (or reference_free is set)")




def steps_from(value: Optional[Union[int, float]], total_steps: int) -> Optional[int]:
    """An interval field (`logging_steps`, `eval_steps`, `save_steps`, `warmup_steps`) in optimizer steps: a float in
    (0, 1) is that fraction of the run's `total_steps`, rounded up, as transformers reads it."""
    if value is None:
        return None
    return max(1, math.ceil(value * total_steps)) if 0 < value < 1 else int(value)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last silently, so a config
    with two `learning_rate:` lines would train with one of them and nobody would be told which."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)) and key is not None:  # `? [a, b]`: a list as a key
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key must be a name, got a {type(key).__name__}", key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def build_config(cls: type, config_file: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """Defaults < YAML file < overrides. Unknown keys name the closest valid key. The result is checked (once, as it
    is made) and resolved for a run (bf16 left unset, local model paths made absolute)."""
    values: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a directory; give the YAML file in it")
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        values.update(read_yaml(path, _UniqueKeyLoader))
    values.update(overrides or {})
    from_file = {k for k in values if k not in (overrides or {})} if config_file else set()
    kwargs, inert = read_keys(cls, values, text=True, config_file=config_file, from_file=from_file)
    cfg = cls(**kwargs)  # checked as it is made
    cfg._resolve()
    cfg.inert_keys = inert  # TRL keys that change nothing here; the trainer names them once
    return cfg


def read_keys(cls: type, values: dict, *, text: bool = False, config_file=None,
              from_file: frozenset | set = frozenset()) -> tuple[dict, dict]:
    """Sort the keys given for a config of `cls` (from Python keywords, or with `text` from YAML / the command line,
    whose values are converted to the fields' types): ``(fields, inert)``, where inert maps each TRL key that changes
    nothing in dpokit to the reason. Any other key is a one-line ConfigError: a key TRL removed says what replaced
    it, an unknown key names the closest valid one. `from_file` are the keys read from `config_file`."""
    values = dict(values)
    compat.apply_aliases(values)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs, inert = {}, {}
    for key, value in values.items():
        where = f" in {config_file}" if key in from_file else ""
        if not isinstance(key, str):
            raise ConfigError(f"config key {key!r}{where} is not a setting name (keys are names such as beta)")
        null = is_null(value) if text else value is None
        if key in fields and null and type(None) not in typing.get_args(annotation_of(fields[key].type)):
            # TRL's "decide for me" (completion_only_loss: null): dpokit's default, which is TRL's decision for
            # its data. (bf16: null is the field's own default, resolved when a run is given the config.)
            continue
        if key in fields:
            kwargs[key] = coerce(key, value, fields[key].type) if text else value
        elif key in compat.FOREIGN_KEYS:
            inert[key] = compat.foreign_key(key, value, where)
        elif key in compat.REMOVED_KEYS:
            raise ConfigError(f"{key}{where}: {compat.REMOVED_KEYS[key]}")
        else:
            # dpokit's own keys first: a typo of one (lora_rank) should not be read as a TRL-only key (local_rank).
            raise ConfigError(f"unknown config key {key!r}{where}"
                              f"{closest(key, fields) or closest(key, compat.FOREIGN_KEYS)}")
    return kwargs, inert


def config_from_args(cls: type, args: Any) -> TrainConfig:
    """Turn the `args=` of a trainer (None, a dict, a config of this class, or a TRL / transformers config object
    such as `trl.DPOConfig`) into a checked config resolved for a run. A config object was checked when it was made
    and is not checked again unless a field was changed since."""
    if args is None:
        cfg = cls()
    elif isinstance(args, dict):
        return build_config(cls, overrides=args)
    elif isinstance(args, cls):
        cfg = args
        settings.ensure_checked(cfg)
    elif dataclasses.is_dataclass(args) and callable(getattr(args, "to_dict", None)):
        return build_config(cls, overrides=compat.ported(cls, args))
    else:
        raise ConfigError(f"args must be a {cls.__name__}, a dict or a TRL config, got {type(args).__name__}")
    cfg._resolve()
    return cfg


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

