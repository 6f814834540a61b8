"""Models and tokenizers, loaded by one set of rules for every command (training, `eval`, `pairs`, `export`, the data
tools): the same source checks, the same chat-template reading, the same pad-token rule and the same one-line errors.

Also the model surgery a training run does before its first step (dropout off, LoRA, activation checkpointing,
regional compilation), and `base_model`, the one way through wrappers (DDP, accelerate, peft) to the Hugging Face
model inside.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from dpokit.errors import ConfigError, DpokitError
from dpokit.fileio import read_text
from dpokit.metrics import log


def base_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside any stack of DDP / accelerate (`.module`) and peft (`get_base_model`) wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def check_source(source: Any, what: str) -> None:
    """A source that is clearly a local path (absolute, ./, ../, ~, or more than one '/') must exist; a hub id
    ("org/name") is left to transformers, which fails offline with its own message."""
    text = str(source)
    local = text.startswith(("/", ".", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text
    if local and not Path(text).expanduser().exists():
        raise DpokitError(f"cannot load {what} {text!r}: no such file or directory")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def is_quantized(model: nn.Module) -> bool:
    """Whether `model` holds bitsandbytes-quantized (4- or 8-bit) weights, which only adapters can train."""
    base = base_model(model)
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


def quantization_config(cfg: Any):
    """The BitsAndBytesConfig of `load_in_4bit` (None without it), built from the fields as TRL builds it from its
    ModelConfig (`trl.trainer.utils.get_quantization_config`): the 4-bit weights are computed in `dtype`."""
    if not getattr(cfg, "load_in_4bit", False):
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=None if cfg.dtype == "auto" else cfg.dtype,
                              bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=cfg.use_bnb_nested_quant,
                              bnb_4bit_quant_storage=cfg.bnb_4bit_quant_storage)


def load_model(model: Any, cfg: Any = None, what: str = "model") -> nn.Module:
    """A path / hub id (loaded with from_pretrained) or an in-memory PreTrainedModel (used as is). `cfg` (a
    TrainConfig) supplies dtype, init kwargs, attention kernel, revision, trust_remote_code and QLoRA's quantization
    (load_in_4bit, checked with the config); without it, float32 and transformers' defaults. An in-memory quantized
    policy needs use_peft, as load_in_4bit does: its quantized weights cannot be trained."""
    if isinstance(model, nn.Module):
        if what == "model" and not getattr(cfg, "use_peft", True) and is_quantized(model):
            raise ConfigError("the model is quantized (bitsandbytes), so only LoRA adapters can train: set "
                              "use_peft=true (with peft_config=, that config chooses the adapters)")
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise ConfigError(f"{what} must be a path, a hub id or a PreTrainedModel, got {type(model).__name__}")
    check_source(model, what)
    from transformers import AutoModelForCausalLM

    kwargs = dict(getattr(cfg, "model_init_kwargs", None) or {})
    dtype = getattr(cfg, "dtype", "float32")
    # float32 by default: master weights, with bf16/fp16 from autocast.
    kwargs.setdefault("dtype", dtype if dtype == "auto" else getattr(torch, dtype))
    quantization = quantization_config(cfg)
    if quantization is not None:
        from accelerate import PartialState

        kwargs["quantization_config"] = quantization
        # Each process's whole model on its own GPU, as TRL's get_kbit_device_map places it: bitsandbytes quantizes
        # the weights as they are put there.
        kwargs.setdefault("device_map", {"": PartialState().local_process_index})
    kwargs.setdefault("trust_remote_code", getattr(cfg, "trust_remote_code", False))
    if getattr(cfg, "attn_implementation", None) is not None:
        kwargs.setdefault("attn_implementation", cfg.attn_implementation)
    if getattr(cfg, "model_revision", "main") != "main":
        kwargs.setdefault("revision", cfg.model_revision)
    try:
        return AutoModelForCausalLM.from_pretrained(str(model), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise DpokitError(f"cannot load {what} {str(model)!r}: {_first_line(exc)}") from exc


def read_chat_template(value: str) -> str:
    """`chat_template`: a Jinja template, or the path of a file holding one. Text without Jinja tags ("{{", "{%") is
    a path, and a missing file is an error (used as a template, the path would render every prompt as itself)."""
    if "{{" in value or "{%" in value:
        return value
    if not Path(value).is_file():
        raise ConfigError(f"chat_template: {value!r} is neither a Jinja template nor a file")
    return read_text(value, "chat_template")


def load_tokenizer(source: Any = None, cfg: Any = None, *, tokenizer: Any = None, what: str = "tokenizer",
                   pad: bool = True):
    """`tokenizer` if given, else one loaded from `source` (a path or hub id); then the config's `chat_template`,
    `eos_token` and `pad_token` (TrainConfig fields, or any object with them), and, with `pad`, padding set to EOS
    where the tokenizer has no pad token (the data tools, which never pad, pass pad=False)."""
    tok = tokenizer
    if tok is None:
        if source is None:
            raise ConfigError("no tokenizer: pass processing_class= or set tokenizer_name_or_path "
                              "(an in-memory model carries none)")
        check_source(source, what)
        from transformers import AutoTokenizer

        revision = getattr(cfg, "model_revision", "main")
        extra = {"revision": revision} if revision != "main" else {}
        try:
            tok = AutoTokenizer.from_pretrained(str(source), trust_remote_code=getattr(cfg, "trust_remote_code", False),
                                                **extra)
        except Exception as exc:  # OSError, ValueError, ... for a missing or broken tokenizer
            raise DpokitError(f"cannot load tokenizer {str(source)!r}: {_first_line(exc)}") from exc
    if getattr(cfg, "chat_template", None):
        tok.chat_template = read_chat_template(cfg.chat_template)
    for name in ("eos_token", "pad_token"):  # EOS first: without a pad token, padding takes the EOS set here
        value = getattr(cfg, name, None)
        if value is not None:
            if tok.convert_tokens_to_ids(value) in (None, tok.unk_token_id) and value != tok.unk_token:
                raise ConfigError(f"{name}: {value!r} is not a token of the tokenizer's vocabulary")
            setattr(tok, name, value)
    if pad and tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ConfigError("the tokenizer has neither a pad token nor an EOS token; add one")
        # Padding positions are masked out of attention and loss, so any id works; EOS is the usual choice.
        tok.pad_token = tok.eos_token
        log(f"tokenizer has no pad token; using EOS {tok.eos_token!r} (id {tok.eos_token_id}) for padding")
    return tok


def adapter_base(path: Path) -> str:
    """The base model a LoRA run directory was trained on (its adapter_config.json's base_model_name_or_path)."""
    from peft import PeftConfig

    try:
        base = PeftConfig.from_pretrained(str(path)).base_model_name_or_path
    except (OSError, ValueError) as exc:
        raise DpokitError(f"{path}/adapter_config.json: cannot read ({_first_line(exc)})") from None
    if not base:
        raise DpokitError(f"{path}/adapter_config.json: base_model_name_or_path is empty; the adapter was trained "
                          "from an in-memory model, so its base cannot be found")
    return base


def load_merged(path: Any, what: str = "model") -> tuple[nn.Module, Any]:
    """A full model directory, or a LoRA run (its adapter merged onto its recorded base), in eval mode, with its
    tokenizer (padding with EOS where it has no pad token): how every command other than training reads a model."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{what} {str(path)!r}: no such directory")
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        base = load_model(adapter_base(path), what=f"base model of {path}")
        try:
            model = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
        except (OSError, ValueError, KeyError) as exc:
            raise DpokitError(f"cannot load the adapter in {str(path)!r}: {_first_line(exc)}") from exc
    else:
        model = load_model(path, what=what)
    return model.eval(), load_tokenizer(path, what=what)


def check_vocab(splits: dict, reports: dict, vocab_size: int, what: Optional[str] = None) -> None:
    """Token ids beyond the embedding table would index out of range deep in the model: name the row instead, as
    data errors do (`file.jsonl:LINE` or `source row N`, from the split's report); `what` names the model."""
    for split, examples in splits.items():
        for ex in examples or ():
            for field_name, ids in vars(ex).items():
                if isinstance(ids, np.ndarray) and len(ids) and int(ids.max()) >= vocab_size:
                    prefix = f"{what}: " if what else ""
                    raise DpokitError(f"{prefix}{reports[split].where(ex.row)}: field {field_name!r} has token id "
                                      f"{int(ids.max())} >= the model's vocabulary size {vocab_size} (tokenizer and "
                                      "model do not match)")


# --------------------------------------------------------------------------------------------------------------------
# Before the first step


def disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if config is not None and isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)


def _names(value) -> Optional[list]:
    """A list of module names from a list or a comma-separated string."""
    if isinstance(value, str):
        return [t.strip() for t in value.split(",") if t.strip()]
    return value


def apply_lora(model: nn.Module, cfg: Any, peft_config: Any = None) -> nn.Module:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if is_quantized(model):
        # QLoRA's preparation (peft's): the base frozen, its unquantized weights (norms, embeddings, LM head) in
        # float32. Activation checkpointing stays with `gradient_checkpointing` (enable_checkpointing).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)

    if peft_config is None:
        targets = cfg.lora_target_modules
        targets = targets if targets == "all-linear" else _names(targets)
        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules=targets or "all-linear", task_type="CAUSAL_LM",
                                 modules_to_save=_names(cfg.lora_modules_to_save) or None, use_rslora=cfg.use_rslora,
                                 use_dora=cfg.use_dora)
    try:
        return get_peft_model(model, peft_config)
    except ValueError as exc:
        raise ConfigError(f"LoRA: {_first_line(exc)}") from exc


def enable_checkpointing(model: nn.Module, kwargs: Optional[dict]) -> None:
    """Activation checkpointing with torch's non-reentrant checkpoint unless asked otherwise; transformers'
    `every_n_layers` / `offload` go to its `activation_checkpointing_enable` (where transformers has it)."""
    kwargs = {"use_reentrant": False, **(kwargs or {})}
    extra = {k: kwargs.pop(k) for k in ("every_n_layers", "offload") if k in kwargs}
    if not hasattr(model, "activation_checkpointing_enable") and not extra:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # transformers before 5.24
    elif not hasattr(model, "activation_checkpointing_enable"):
        raise ConfigError(f"gradient_checkpointing_kwargs {sorted(extra)} need a transformers with "
                          "activation_checkpointing_enable (this one has none); drop them")
    else:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, **extra)
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # so checkpointed blocks see a grad path under LoRA


def compile_layers(model: nn.Module, cfg: Any) -> None:
    """`torch.compile` each decoder layer in place (the model's `_no_split_modules` classes, e.g. LlamaDecoderLayer):
    the layers share one compiled graph, so compiling takes one layer's time, and the LM head, which dpokit runs in
    its own chunks, stays eager. Dynamic shapes: packed and padded batches change length every step."""
    base = base_model(model)
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(f"torch_compile: cannot find the decoder layers of {type(base).__name__} (no "
                          "_no_split_modules); turn torch_compile off")
    for layer in layers:
        layer.compile(backend=cfg.torch_compile_backend or "inductor", mode=cfg.torch_compile_mode, dynamic=True)
