"""Fixtures for the data-layer tests: the shared HH file and Llama-2 tokenizer, loaded once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# <repo>/tests/data/conftest.py: parents[2] is the repository root, parents[3] the folder holding it and shared/.
SHARED = Path(__file__).resolve().parents[3] / "shared"
LLAMA2 = SHARED / "tokenizers" / "llama2"
HH_FILE = SHARED / "data" / "hh-rlhf-harmless-test.jsonl.gz"

# Renders messages exactly as an Anthropic HH transcript, so parse_hh_transcript + this template == the raw text.
# Newlines are written as Jinja string literals: HF renders templates with trim_blocks, which would eat a newline
# that follows a {% %} tag.
HH_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '\\n\\nHuman: ' if m['role'] == 'user' else '\\n\\nAssistant: ' }}{{ m['content'] }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '\\n\\nAssistant:' }}{% endif %}"
)

# A Llama-2-chat-like template: BOS in the text, each assistant turn closed by EOS.
INST_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ '<<SYS>>' + m['content'] + '<</SYS>>' }}"
    "{% elif m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)

# A ChatML-like template: turns end with a newline after the end marker, so EOS is not the last token.
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def _load(**kwargs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(LLAMA2, **kwargs)


@pytest.fixture(scope="session")
def llama2():
    """The plain Llama-2 tokenizer (adds BOS, no chat template). Never modify it in a test."""
    return _load()


@pytest.fixture(scope="session")
def llama2_chat():
    """A second Llama-2 tokenizer to which tests assign chat templates."""
    return _load()


@pytest.fixture(scope="session")
def hh_rows():
    from dpokit.data import load_rows

    return load_rows(HH_FILE)
