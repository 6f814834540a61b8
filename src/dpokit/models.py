"""Models and tokenizers, loaded by one set of rules for every command (training, `eval`, `pairs`, `export`, the data
tools): the same source checks, the same chat-template reading, the same pad-token rule and the same one-line errors.

Also the model surgery a training run does before its first step (dropout off, LoRA, activation checkpointing,
regional compilation), and `base_model`, the one way through wrappers (DDP, accelerate, peft) to the Hugging Face
model inside.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
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


def _reason(exc: BaseException, limit: int = 300) -> str:
    """A library's error message as one line: its first lines joined (transformers' validation errors put the field
    on the first line and what is wrong with it on the next)."""
    text = " ".join(str(exc).split())
    return (text[:limit] + " ...") if len(text) > limit else text or type(exc).__name__


class _HeldLoadReport(logging.Filter):
    """Holds back the load report transformers logs (a multi-line table) while a model loads: printed again as it
    was when the load succeeds; when the load fails, its size mismatches go into the one-line error instead."""

    LOGGER = "transformers.modeling_utils"

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.mismatches: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "LOAD REPORT" not in text:
            return True
        self.records.append(record)
        plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
        for row in plain.splitlines():
            cells = [c.strip() for c in row.split("|")]
            if len(cells) >= 3 and cells[1] == "MISMATCH":
                found = re.search(r"ckpt: torch\.Size\((\[.*?\])\) vs model:\s*torch\.Size\((\[.*?\])\)", row)
                shapes = f" is {found.group(1)} in the weights, {found.group(2)} by the config" if found else ""
                self.mismatches.append(f"{cells[0]}{shapes}")
        return False

    def __enter__(self):
        logging.getLogger(self.LOGGER).addFilter(self)
        return self

    def __exit__(self, kind, exc, tb):
        logger = logging.getLogger(self.LOGGER)
        logger.removeFilter(self)
        if kind is None:
            for record in self.records:
                logger.handle(record)
        return False


# The small JSON files each kind of `from_pretrained` reads from a local directory. `loading` reads them first,
# through the guarded reader, so that a damaged one is named with its line (transformers would say "Expecting
# property name" or raise a RecursionError without saying which file); each load reads only its own.
CONFIG_FILES = ("config.json",)
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")
TOKENIZER_FILES = ("config.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")


@contextlib.contextmanager
def loading(what: str, source: Any, files: tuple = (), weights: bool = False, part: str = ""):
    """The one guard around every `from_pretrained` (models, adapters, reward models, tokenizers, configs): whatever
    transformers, peft, safetensors or torch raise for a broken, foreign or unsafe file becomes one line naming
    `what` and `source` (and `part`, the piece that was being read). A local directory's JSON `files` are read first,
    and with `weights` its safetensors files are checked (a cut-short file is named with what is wrong). `--debug`
    shows the traceback."""
    import pickle

    from safetensors import SafetensorError

    check_source(source, what)
    check_json_files(source, what, files)
    if weights:
        check_weight_files(source, what)
    held = _HeldLoadReport()
    try:
        with held:
            yield
    except DpokitError:
        raise
    except pickle.UnpicklingError:
        # torch.load(weights_only=True) met a pickle that holds more than tensors: loading it would run its code.
        found = sorted(p.name for p in Path(str(source)).expanduser().glob("*.bin")) if Path(
            str(source)).expanduser().is_dir() else []
        files = ", ".join(found) or "pytorch_model*.bin"
        raise DpokitError(f"cannot load {what} {str(source)!r}: its pickle weights ({files}) hold non-tensor objects "
                          "and were refused as possibly unsafe (loading them could run code); use a safetensors copy "
                          "of the model") from None
    except SafetensorError as exc:  # damaged in a way the header check does not see
        raise DpokitError(f"cannot load {what} {str(source)!r}: a weight file is damaged ({_first_line(exc)})") from None
    except Exception as exc:
        if isinstance(exc, RuntimeError) and held.mismatches:  # transformers' "size mismatch" table, as one line
            shown = "; ".join(held.mismatches[:2])
            more = f" and {len(held.mismatches) - 2} more" if len(held.mismatches) > 2 else ""
            raise DpokitError(f"cannot load {what} {str(source)!r}: its weights do not fit its config.json "
                              f"({len(held.mismatches)} tensors of another shape: {shown}{more})") from exc
        # Whatever else the file did to the library reading it: a TypeError for a config field of the wrong type
        # (peft reads adapter_config.json's "r": "8" as given), tokenizers' plain Exception for a broken
        # tokenizer.json, a RuntimeError for adapter weights of another rank.
        raise DpokitError(f"cannot load {what} {str(source)!r}{part}: {type(exc).__name__}: {_reason(exc)}") from exc


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
    with loading(what, model, MODEL_FILES, weights=True):
        return AutoModelForCausalLM.from_pretrained(str(model), **kwargs)


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
        from transformers import AutoTokenizer

        revision = getattr(cfg, "model_revision", "main")
        extra = {"revision": revision} if revision != "main" else {}
        with loading(what, source, TOKENIZER_FILES, part=" (its tokenizer)" if what != "tokenizer" else ""):
            tok = AutoTokenizer.from_pretrained(str(source), trust_remote_code=getattr(cfg, "trust_remote_code", False),
                                                **extra)
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
    """The base model a LoRA run directory was trained on (its adapter_config.json's base_model_name_or_path). The
    file is read through the guarded JSON reader, so a damaged one is one line naming it (peft would raise a
    TypeError for a list, a RecursionError for deep nesting)."""
    from dpokit.fileio import json_type_name, read_json

    config_file = Path(path) / "adapter_config.json"
    config = read_json(config_file)
    if not isinstance(config, dict):
        raise DpokitError(f"{config_file}: expected a JSON object (a peft adapter config), got "
                          f"{json_type_name(config)}")
    _check_adapter_fields(config, config_file)
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise DpokitError(f"{config_file}: base_model_name_or_path must be a string, got {base!r}")
    if not base:
        raise DpokitError(f"{config_file}: base_model_name_or_path is empty; the adapter was trained "
                          "from an in-memory model, so its base cannot be found")
    return base


def _check_adapter_fields(config: dict, config_file: Path) -> None:
    """The scalar fields of a LoRA adapter config (`r`, `lora_alpha`, `lora_dropout`, `use_dora`, ...) have the types
    peft declares: peft reads them as given, and `"r": "eight"` would fail deep inside a layer."""
    import dataclasses
    import typing

    from peft import LoraConfig

    if config.get("peft_type", "LORA") != "LORA":
        return
    hints = typing.get_type_hints(LoraConfig)
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    for field in dataclasses.fields(LoraConfig):
        kind, value = hints.get(field.name), config.get(field.name)
        if field.name not in config or kind not in words or value is None:
            continue
        fits = isinstance(value, kind) and (kind is bool or not isinstance(value, bool)) or (
            kind is float and isinstance(value, int) and not isinstance(value, bool))
        if not fits:
            raise DpokitError(f"{config_file}: {field.name} must be {words[kind]}, got {value!r}")


def load_merged(path: Any, what: str = "model") -> tuple[nn.Module, Any]:
    """A full model directory, or a LoRA run (its adapter merged onto its recorded base), in eval mode, with its
    tokenizer (padding with EOS where it has no pad token): how every command other than training reads a model."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{what} {str(path)!r}: no such directory")
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        base_path = adapter_base(path)
        if not any((path / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
            raise DpokitError(f"cannot load adapter run {str(path)!r}: it has adapter_config.json but no "
                              "adapter_model.safetensors (the adapter's weights)")
        check_weight_files(path, "adapter run")  # before the base model loads, which may take minutes
        base = load_model(base_path, what=f"base model of {path}")
        with loading("adapter run", path):  # its config (adapter_base) and weights are checked above
            model = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
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


def model_path(model: nn.Module) -> Optional[str]:
    """Where an in-memory model was loaded from (`from_pretrained` sets `name_or_path`; a model built from a config
    has none): a local directory absolute, a hub id as it is. None when it names nothing."""
    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not isinstance(path, str) or not path:
        return None
    return str(Path(path).expanduser().resolve()) if Path(path).expanduser().exists() else path


def record_lora(cfg: Any, model: nn.Module) -> Any:
    """`cfg` with the LoRA settings the adapter of `model` was really built with (a `peft_config=` overrides the
    config's lora_* keys), so that the run's record says what was trained and a resume compares what matters."""
    import dataclasses

    lora = model.peft_config[model.active_adapter]

    def names(value):
        return sorted(value) if isinstance(value, (set, list, tuple)) else value

    alpha = lora.lora_alpha
    return dataclasses.replace(
        cfg, use_peft=True, lora_r=lora.r, lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
        lora_dropout=lora.lora_dropout, lora_target_modules=names(lora.target_modules),
        lora_modules_to_save=names(lora.modules_to_save), use_rslora=bool(lora.use_rslora),
        use_dora=bool(lora.use_dora))


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


def safetensors_problem(path: Path) -> Optional[str]:
    """What is wrong with a .safetensors file (empty, cut short, a header that is not one), or None. Cheap: reads the
    8-byte header length and the header, then compares the file's size with the end of its last tensor, which is
    what a kill or a full disk during a save leaves wrong."""
    import json
    import struct

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size < 8:
                return f"{size} bytes, too short for a safetensors header"
            (length,) = struct.unpack("<Q", f.read(8))
            if 8 + length > size:
                return f"{size} bytes, shorter than its {length}-byte header says"
            header = json.loads(f.read(length))
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    except (ValueError, UnicodeDecodeError, RecursionError):
        return "its header is not valid JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    ends = [entry["data_offsets"][1] for name, entry in header.items()
            if name != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        return f"{size} bytes, cut short ({expected} expected)"
    return None


def _weight_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def check_json_files(source: Any, what: str, files: tuple) -> None:
    """Each of `files` in a local model directory is a JSON object, or a one-line error naming it."""
    from dpokit.fileio import json_type_name, read_json

    directory = Path(str(source)).expanduser()
    if not files or not directory.is_dir():
        return
    for name in files:
        if (directory / name).is_file():
            value = read_json(directory / name)
            if not isinstance(value, dict):
                raise DpokitError(f"cannot load {what} {str(source)!r}: {directory / name} holds a JSON "
                                  f"{json_type_name(value)}, not an object")


def check_weight_files(source: Any, what: str) -> None:
    """A local model directory whose weight files are damaged (a 0-byte or truncated model.safetensors) is named with
    what is wrong before transformers reads it (it would say only "Error while deserializing header")."""
    directory = Path(str(source)).expanduser()
    if not directory.is_dir():
        return
    for file in _weight_files(directory):
        wrong = safetensors_problem(file)
        if wrong:
            raise DpokitError(f"cannot load {what} {str(source)!r}: {file.name} is damaged or incomplete ({wrong})")


# --------------------------------------------------------------------------------------------------------------------
# Before the weights load


def model_config(model: Any, cfg: Any = None, what: str = "model"):
    """The model's transformers config: an in-memory model's own, or read from its directory / hub id (cheap: no
    weights), so that settings can be checked against the model before billions of weights load."""
    if isinstance(model, nn.Module):
        return getattr(model, "config", None)
    from transformers import AutoConfig

    revision = getattr(cfg, "model_revision", "main")
    with loading(what, model, CONFIG_FILES, part=" (config.json)"):
        return AutoConfig.from_pretrained(str(model), trust_remote_code=getattr(cfg, "trust_remote_code", False),
                                          **({"revision": revision} if revision != "main" else {}))


def _loading_options() -> set[str]:
    """The keyword arguments `from_pretrained` itself takes (its signature and the options it pops from **kwargs),
    read from the installed transformers so that the list follows its version."""
    import inspect
    import re

    from transformers import PreTrainedModel

    method = PreTrainedModel.from_pretrained
    return set(inspect.signature(method).parameters) | set(re.findall(r'kwargs\.pop\(\s*"(\w+)"',
                                                                      inspect.getsource(method)))


def check_init_kwargs(config, cfg: Any, what: str = "model") -> None:
    """Each `model_init_kwargs` key must be a `from_pretrained` option or a setting of the model's config: anything
    else would fail deep inside the model's constructor (or, worse, be stored on the config and ignored)."""
    kwargs = getattr(cfg, "model_init_kwargs", None) or {}
    if not kwargs or config is None:
        return
    known = _loading_options() | set(config.to_dict()) | {k for k in dir(config) if not k.startswith("_")}
    for key in kwargs:
        if key not in known:
            raise ConfigError(f"model_init_kwargs: {key!r} is neither a from_pretrained option nor a setting of "
                              f"{what}'s {type(config).__name__}")


def position_limit(config) -> Optional[tuple[int, str]]:
    """(the longest sequence the model can place, why), or None when its positions set no limit (ALiBi, dynamic
    RoPE scaling). Learned absolute positions (GPT-2's `n_positions`) end at their table; RoPE models are refused
    past `max_position_embeddings` unless a RoPE scaling covers the length (positions there were never trained)."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(limit, int):
        return None
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if rope is None and getattr(config, "rope_theta", None) is None:
        return limit, f"its positions are learned up to {limit}"
    rope = dict(rope or {})
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "dynamic":
        return None
    factor = rope.get("factor")
    if kind != "default" and factor:
        covered = int(factor * (rope.get("original_max_position_embeddings") or limit))
        return max(limit, covered), f"its RoPE scaling ({kind}, factor {factor}) covers {max(limit, covered)}"
    return limit, (f"max_position_embeddings is {limit} and no RoPE scaling covers more (add one, e.g. "
                   "model_init_kwargs: {rope_scaling: {rope_type: yarn, factor: 2.0}})")


def sequence_length(example) -> int:
    """The positions one tokenized example takes (a pair's rejected restarts after the prompt, also when packed with
    a shared prompt)."""
    if hasattr(example, "chosen_ids"):
        return len(example.prompt_ids) + max(len(example.chosen_ids), len(example.rejected_ids))
    return len(example.prompt_ids) + len(example.completion_ids)


def check_positions(config, splits: dict, reports: dict, max_length: Optional[int], what: str = "model") -> None:
    """Refuse, before the weights load, a training row longer than the model can place: past learned positions the
    forward is an index error (a device-side assert on CUDA), past RoPE's trained range it trains silently on
    positions the model never saw."""
    bound = position_limit(config) if config is not None else None
    if bound is None:
        return
    limit, why = bound
    for split, examples in splits.items():
        longest = max(examples or (), key=sequence_length, default=None)
        if longest is not None and sequence_length(longest) > limit:
            raise ConfigError(f"{reports[split].where(longest.row)}: {sequence_length(longest)} tokens, more than "
                              f"{what} can place ({why}); set max_length to at most {limit} (it is {max_length})")
