"""Export a LoRA run as a full model: base weights with the adapter merged in, loadable by plain transformers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from dpokit.errors import DpokitError


def merge_adapter(adapter_dir: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Load the adapter's base model (recorded in adapter_config.json), merge, save model and tokenizer atomically."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir, out = Path(adapter_dir), Path(output_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise DpokitError(f"{adapter_dir}: no adapter_config.json (not a LoRA run; a full model needs no merge)")
    base_path = PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    if not base_path:
        raise DpokitError(f"{adapter_dir}/adapter_config.json: base_model_name_or_path is empty; "
                          "the adapter was trained from an in-memory model, so its base cannot be found")
    try:
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    except OSError as exc:
        raise DpokitError(f"cannot load the adapter's base model {base_path!r}: {str(exc).splitlines()[0]}") from exc
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    merged.save_pretrained(str(tmp), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
