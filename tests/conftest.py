"""Shared fixtures: tiny models built from config (no downloads) and the read-only ../shared folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

SHARED = Path(__file__).resolve().parents[2] / "shared"
LLAMA2_TOKENIZER = SHARED / "tokenizers" / "llama2"
HH_FILE = SHARED / "data" / "hh-rlhf-harmless-test.jsonl.gz"


def tiny_llama(vocab_size: int = 128, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg))


# Pairs a tiny model learns in a few steps (the preferred answer is the right one), shared by the trainer tests.
EVEN_ODD_PAIRS = [{"prompt": f"Question {i}: is {i} even?", "chosen": f" {'Yes' if i % 2 == 0 else 'No'}.",
                   "rejected": f" {'No' if i % 2 == 0 else 'Yes'}, surely."} for i in range(6)]
# Three short pairs for tests that only need a run to exist.
SHORT_PAIRS = [
    {"prompt": "The weather today is", "chosen": " sunny and warm.", "rejected": " cold, grey and wet."},
    {"prompt": "My favourite food is", "chosen": " fresh bread.", "rejected": " nothing at all."},
    {"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " 5, probably"},
]


def quick_dpo_config(tmp_path, **overrides):
    """A DPOConfig for one quick epoch on EVEN_ODD_PAIRS, logging every step and saving nothing unless asked."""
    from dpokit import DPOConfig

    base = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, learning_rate=1e-3, max_steps=-1,
                num_train_epochs=1, logging_steps=1, save_steps=0, disable_tqdm=True, seed=0,
                per_device_eval_batch_size=4)
    base.update(overrides)
    return DPOConfig(**base)


@pytest.fixture(scope="session")
def tok():
    """The real Llama-2 tokenizer, loaded once (a module may define its own `tok`)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(LLAMA2_TOKENIZER)


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    """A tiny Llama saved with the Llama-2 tokenizer: a local base model, as a user's would be (read, never written)."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("base") / "tiny"
    tiny_llama(vocab_size=32000).save_pretrained(path)
    AutoTokenizer.from_pretrained(LLAMA2_TOKENIZER).save_pretrained(path)
    return path


@pytest.fixture
def llama2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(LLAMA2_TOKENIZER)


def refused(capsys, argv, *needles, unchanged=()) -> str:
    """Run `dpokit ARGV` in-process and check a user mistake's contract: exit code 2, one line on stderr holding every
    needle (the file, the line), no traceback, and every file in `unchanged` byte for byte as it was; returns the
    line."""
    from dpokit.cli import main

    before = {Path(p): Path(p).read_bytes() for p in unchanged}
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, err)
    for needle in needles:
        assert str(needle) in lines[0], (needle, err)
    for path, content in before.items():
        assert path.read_bytes() == content, f"{path} changed"
    return lines[0]
