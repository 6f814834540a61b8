"""Compatibility with TRL and transformers, in one place.

- Their config keys that dpokit has no field for, each with what dpokit does instead: a TRL config must port without
  edits, and nothing it asks for may be dropped silently, so `dpokit.config` reads every key through these tables
  (`FOREIGN_KEYS`, `ALIASES`, `ported` for a `trl.DPOConfig` object).
- Their trainer keywords dpokit cannot honour, refused by name (`refuse_trl_arguments`), and their trainer methods
  dpokit never calls, refused when a subclass overrides one (`refuse_trl_overrides`).
- `TransformersTrainerAPI`: what code written against their trainers reaches for, with their names: `state` (a
  `TrainerState`), `evaluate()` with its metric names (``eval_loss``), `log_metrics`, `save_metrics`, `save_state`.
  dpokit's own records (metrics.jsonl, the report) keep dpokit's names (``eval/loss``).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from dpokit.errors import ConfigError
from dpokit.settings import coerce

# One way to ask for QLoRA, as TRL's ModelConfig has it, so a run's config records it (a BitsAndBytesConfig object
# would not be written to YAML).
QLORA_FIELDS = ("set load_in_4bit (with bnb_4bit_quant_type, use_bnb_nested_quant, bnb_4bit_quant_storage) "
                "instead; dpokit builds the BitsAndBytesConfig from them, as TRL's get_quantization_config does")

# --------------------------------------------------------------------------------------------------------------------
# TRL / transformers config keys without a dpokit field
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
    "restore_callback_states_from_checkpoint": (False, "callbacks start afresh on resume (their state is recorded in "
                                                       "the checkpoint's trainer_state.json, not read back)"),
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
    "load_in_8bit": (False, "quantized 8-bit (LLM.int8) training is not supported; load_in_4bit (QLoRA) is"),
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


# Keys of earlier TRL DPOConfigs (0.x) that TRL 1.16 no longer has, with what replaced them. Such a key comes from
# an older script; "did you mean" would point it at an unrelated name, so it gets this line instead.
REMOVED_KEYS = {
    "generate_during_eval": "TRL removed it; compare samples of the trained model and its reference with "
                            "`dpokit eval RUN --prompts FILE --judge SPEC` (docs/evaluation.md)",
    "max_target_length": "an old TRL name of the completion limit: use max_completion_length",
    "padding_value": "TRL removed it; batches are padded with pad_token, and padding never enters the loss",
    "label_pad_token_id": "TRL removed it; the loss reads only completion tokens (a mask, not a label pad id)",
    "ref_adapter_name": "TRL removed it; under LoRA the default reference is the model with its adapters off, "
                        "or give ref_model / ref_model_name_or_path",
    "model_adapter_name": "TRL removed it; use_peft (or peft_config=) trains one adapter, saved to output_dir",
    "force_use_ref_model": "TRL removed it; a ref_model / ref_model_name_or_path given is always used, with or "
                           "without LoRA",
    "ref_model_init_kwargs": "TRL removed it; a reference named by ref_model_name_or_path is loaded with the "
                             "policy's model_init_kwargs and dtype (pass a loaded ref_model= for other settings)",
    "use_logits_to_keep": "TRL removed it; dpokit never holds prompt logits: the LM head runs on completion "
                          "tokens only, in chunks of logps_chunk_size",
    "use_num_logits_to_keep": "TRL removed it; dpokit never holds prompt logits: the LM head runs on completion "
                              "tokens only, in chunks of logps_chunk_size",
    "is_encoder_decoder": "TRL removed it; dpokit trains decoder-only causal LMs",
    "tools": "TRL removed it from DPOConfig; describe the tools in the prompt (or the system message)",
    "use_liger_loss": "TRL removed it; dpokit does not use Liger kernels (logps_chunk_size bounds the LM head's "
                      "memory)",
    "base_model_attribute_name": "TRL removed it with use_liger_loss; dpokit finds the decoder itself",
}


# transformers' newer names for the same settings (its own aliases): read into the dpokit field.
ALIASES = {"activation_checkpointing": "gradient_checkpointing",
           "activation_checkpointing_kwargs": "gradient_checkpointing_kwargs",
           "torch_dtype": "dtype",  # transformers v5's new name
           "chat_template_path": "chat_template"}  # dpokit's chat_template also takes a file


def at_default(value: Any, default: Any) -> bool:
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
            return coerce("", value, bool) is default  # the config reads true/false this way
        except ConfigError:
            return False
    if isinstance(default, (int, float)):
        try:
            return float(value) == float(default)
        except (TypeError, ValueError):
            return False
    return str(value) == str(default)


def apply_aliases(values: dict) -> None:
    """Move each value given under a transformers alias to its dpokit key (in place); two values of one setting that
    disagree are refused."""
    for alias, name in ALIASES.items():
        if alias in values:
            value = values.pop(alias)
            if value is None:
                continue
            if name in values and values[name] is not None and values[name] != value:
                raise ConfigError(f"{alias} ({value!r}) and {name} ({values[name]!r}) disagree; they are one setting")
            values[name] = value


def foreign_key(key: str, value: Any, where: str = "") -> str:
    """Why a FOREIGN_KEYS key changes nothing in dpokit, if `value` asks for nothing dpokit does differently;
    otherwise ConfigError with the reason (`where` names the file it came from)."""
    default, reason = FOREIGN_KEYS[key]
    if default is not ANY and not at_default(value, default):
        raise ConfigError(f"{key}: {value!r}{where} is not supported: {reason}")
    return reason


# --------------------------------------------------------------------------------------------------------------------
# A TRL / transformers config object


def ported(cls: type, args: Any) -> dict:
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


# --------------------------------------------------------------------------------------------------------------------
# TRL trainer keyword arguments

# Keyword arguments of TRL's trainers that dpokit's do not take, with what dpokit does instead. None (TRL's default)
# is accepted, so code written for TRL runs unchanged; anything else is refused rather than silently ignored.
TRL_TRAINER_ARGUMENTS = {
    "data_collator": "dpokit builds its own batches (padded, or packed with padding_free) from the tokenized rows",
    "compute_metrics": "dpokit's evaluation gathers no predictions (EvalPrediction) to compute metrics from; it "
                       "reports eval_loss, eval_rewards/... per pair, which a TrainerCallback's on_evaluate(metrics=...) "
                       "receives, and `dpokit eval` computes win rates and more",
    "preprocess_logits_for_metrics": "evaluation never holds full-vocabulary logits",
    "compute_loss_func": "the loss is chosen with loss_type (DPO) or is the completion NLL (SFT)",
    "optimizers": "the optimizer is AdamW from optim, learning_rate, adam_* and weight_decay, the schedule from "
                  "lr_scheduler_type and lr_scheduler_kwargs",
    "optimizer_cls_and_kwargs": "the optimizer is AdamW from optim, learning_rate, adam_* and weight_decay",
    "formatting_func": "rows are read by their format (prompt/completion, messages, text); rename columns with "
                       "column_map",
    "quantization_config": "in the config: " + QLORA_FIELDS,
}


def refuse_trl_arguments(trainer: str, arguments: dict) -> None:
    """TRL trainer keywords at TRL's default (None) pass; any other value, or an unknown keyword, is refused."""
    for name, value in arguments.items():
        if name not in TRL_TRAINER_ARGUMENTS:
            raise TypeError(f"{trainer}() got an unexpected keyword argument {name!r}")
        if value is not None and value != (None, None):
            raise ConfigError(f"{trainer}: {name} is not supported: {TRL_TRAINER_ARGUMENTS[name]}")


# Methods of TRL's and transformers' trainers that a subclass overrides to change training, and that dpokit's
# trainers never call (they are not methods of theirs): such an override would be ignored without a word, so a
# subclass that has one is refused when it is made, with what to do instead. A name dpokit's trainers define is
# called, so overriding it is allowed.
_LOSS = ("add a loss with dpokit.losses.register and set loss_type to its name (or to module:function; see "
         "docs/losses.md); to change how a batch becomes a loss, override loss_and_metrics(batch, train)")
_LOGPS = ("dpokit computes the sequence log-probs itself (dpokit.logps) and hands them to the loss: add a loss with "
          "dpokit.losses.register (docs/losses.md) or override loss_and_metrics(batch, train)")
_BATCHES = "batches come from dpokit's data schedule; override collate(examples) to change how they are made"
TRL_TRAINER_METHODS = {
    "compute_loss": _LOSS,
    "_compute_loss": _LOSS,
    "dpo_loss": _LOSS,
    "get_batch_loss_metrics": _LOSS,
    "concatenated_forward": _LOGPS,
    "concatenated_inputs": _LOGPS,
    "compute_ref_log_probs": "the reference log-probs come from ref_model (default: the frozen starting policy), "
                             "cached with precompute_ref_log_probs; override ref_logps(batch, train) to change them",
    "prediction_step": "evaluation runs loss_and_metrics(batch, train=False) over the eval pairs; override that",
    "create_optimizer": "the optimizer is AdamW from optim, learning_rate, adam_* and weight_decay",
    "create_scheduler": "the schedule comes from lr_scheduler_type and lr_scheduler_kwargs",
    "get_train_dataloader": _BATCHES,
    "get_eval_dataloader": _BATCHES,
    "log": "metrics go to metrics.jsonl and report_to; trainer.state.log_history holds them",
}


def refuse_trl_overrides(cls: type) -> None:
    """ConfigError if `cls` (a subclass of a dpokit trainer) defines a TRL / transformers trainer method that no
    dpokit class in its bases defines, i.e. one dpokit never calls."""
    ours = [k for k in cls.__mro__ if k.__module__.split(".")[0] == "dpokit"]
    for name, instead in TRL_TRAINER_METHODS.items():
        if any(name in vars(k) for k in ours):
            continue
        owner = next((k for k in cls.__mro__ if name in vars(k)), None)
        if owner is not None:
            raise ConfigError(f"{owner.__name__}.{name} overrides a method of TRL's trainer that dpokit's "
                              f"{ours[0].__name__} never calls: {instead}")


# --------------------------------------------------------------------------------------------------------------------
# transformers' trainer API


def transformers_names(record: dict) -> dict:
    """A metrics record with transformers' names for evaluation metrics (``eval/loss`` -> ``eval_loss``; a named
    evaluation set's ``eval_<name>/loss`` -> ``eval_<name>_loss``)."""
    return {_EVAL_KEY.sub(r"\1_", k): v for k, v in record.items()}


_EVAL_KEY = re.compile(r"^(eval(?:_[^/]+)?)/")


def tokenized_dataset(examples: list):
    """Tokenized examples as TRL's trainers hold their tokenized dataset (TRL 1.x column names): preference pairs as
    prompt_ids, chosen_ids, rejected_ids; SFT examples as input_ids (prompt + completion) and completion_mask."""
    import datasets

    from dpokit.data.tokenize import TokenizedPair

    if examples and isinstance(examples[0], TokenizedPair):
        return datasets.Dataset.from_dict({name: [getattr(ex, name).tolist() for ex in examples]
                                           for name in ("prompt_ids", "chosen_ids", "rejected_ids")})
    return datasets.Dataset.from_dict({
        "input_ids": [ex.prompt_ids.tolist() + ex.completion_ids.tolist() for ex in examples],
        "completion_mask": [[0] * len(ex.prompt_ids) + [1] * len(ex.completion_ids) for ex in examples]})


class TransformersTrainerAPI:
    """Mixed into `dpokit.trainer.Trainer`; reads its `args`, `events` (`dpokit.callbacks`), data, `accelerator` and
    `output_dir`."""

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """The training metrics on `eval_dataset` (any source the constructor takes: a path, a `datasets.Dataset`, a
        list of rows, or a dict of them), else on the trainer's evaluation sets, named as transformers' and TRL's
        `evaluate()` name them: ``eval_loss``, ``eval_rewards/chosen``, ... (`metric_key_prefix` + "_"; a dict's sets
        ``eval_<name>_loss``). The metrics are logged (`state.log_history`, `on_log`) and `on_evaluate` is called."""
        from dpokit.data.sources import eval_splits
        from dpokit.errors import ConfigError

        sets = None
        if eval_dataset is not None:
            sets = self._prepare_eval_sets(eval_splits(eval_dataset))
        elif not self.eval_sets:
            raise ConfigError("no eval data: pass eval_dataset= (to the trainer or to evaluate) or set eval_file")
        ignored = {f"{metric_key_prefix}_{k}" for k in ignore_keys or ()}
        # The trainer's own sets under the default prefix also update the best metric, as in transformers.
        own = sets is None and metric_key_prefix == "eval"
        metrics = self._evaluate_sets(None if own else sets or self.eval_sets, metric_key_prefix, to_file=False)
        return {k: v for k, v in metrics.items() if k not in ignored}

    def _prepare_eval_sets(self, sources: dict) -> dict:
        """Evaluation sets given to `evaluate`, read, checked and tokenized as the trainer's own are (without
        replacing the run's data report)."""
        from dpokit.errors import ConfigError

        if getattr(self.args, "precompute_ref_log_probs", False):
            raise ConfigError("evaluate(eval_dataset=...): with precompute_ref_log_probs the reference model was freed "
                              "after precomputing the trainer's data; pass this set to the trainer (eval_dataset=, a "
                              "dict for several) or set precompute_ref_log_probs=false")
        from dpokit import models

        reports, names = dict(self.data_reports), dict(self.data_sources)
        try:
            sets = {split: self.prepare_data(source, split) for split, source in sources.items()}
            vocab = self.model.get_input_embeddings().num_embeddings
            models.check_vocab(sets, self.data_reports, vocab)
            models.check_positions(self.model.config, sets, self.data_reports, self.args.max_length, "the model")
        finally:
            self.data_reports, self.data_sources = reports, names
        return sets

    @property
    def state(self):
        """The run as transformers' `TrainerState`, kept up to date by the loop (global_step, max_steps, epoch,
        log_history with transformers' names, best_metric, best_model_checkpoint), the object callbacks receive."""
        return self.events.state

    @property
    def control(self):
        """transformers' `TrainerControl` of the run (what callbacks set: should_training_stop, should_save, ...)."""
        return self.events.control

    @property
    def callback_handler(self):
        return self.events.handler

    def add_callback(self, callback) -> None:
        """Add a `transformers.TrainerCallback` (class or instance), as transformers' `Trainer.add_callback`."""
        self.events.handler.add_callback(callback)

    def pop_callback(self, callback):
        """Remove a callback (class or instance) and return it (transformers' `Trainer.pop_callback`)."""
        return self.events.handler.pop_callback(callback)

    def remove_callback(self, callback) -> None:
        """Remove a callback (class or instance; transformers' `Trainer.remove_callback`)."""
        self.events.handler.remove_callback(callback)

    # The objects TRL's trainers expose under these names.
    @property
    def processing_class(self):
        return self.tokenizer

    @property
    def lr_scheduler(self):
        return self.scheduler

    @property
    def ref_model(self):
        """The reference model (None with LoRA, where the reference is the adapter turned off, with a reference-free
        loss, or once precomputed reference log-probs have freed it), as TRL's `ref_model`."""
        return getattr(self, "_ref_module", None)

    @property
    def train_dataset(self):
        """The tokenized training rows as a `datasets.Dataset` with TRL's column names (DPO: prompt_ids, chosen_ids,
        rejected_ids; SFT: input_ids, completion_mask), or None."""
        return None if self.train_examples is None else tokenized_dataset(self.train_examples)

    @property
    def eval_dataset(self):
        """The tokenized evaluation rows as `train_dataset` shows them; a dict {name: Dataset} for several sets."""
        if not self.eval_sets:
            return None
        if list(self.eval_sets) == ["eval"]:
            return tokenized_dataset(self.eval_sets["eval"])
        return {split[len("eval_"):]: tokenized_dataset(ex) for split, ex in self.eval_sets.items()}

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
        from dpokit.fileio import atomic_write_text, read_json

        atomic_write_text(self.output_dir / f"{split}_results.json", json.dumps(metrics, indent=4, sort_keys=True))
        if combined:
            path = self.output_dir / "all_results.json"
            merged = {**(read_json(path) if path.is_file() else {}), **metrics}
            atomic_write_text(path, json.dumps(merged, indent=4, sort_keys=True))

    def save_state(self) -> None:
        """Write `state` to output_dir/trainer_state.json (transformers' `Trainer.save_state`; main process only)."""
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.state.save_to_json(str(self.output_dir / "trainer_state.json"))
