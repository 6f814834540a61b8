"""Several runs in one Python process: trainers of different precision (bf16 / fp32, as transformers resets
accelerate's process-wide state for each run) and gradient accumulation, in either order, each giving the numbers it
gives when run first; a trainer made before another keeps its own precision."""

from __future__ import annotations

import json

import pytest

from conftest import LLAMA2_TOKENIZER, tiny_llama
from dpokit import DPOConfig, DPOTrainer

PAIRS = [
    {"prompt": "The weather today is", "chosen": " sunny and warm.", "rejected": " cold, grey and wet."},
    {"prompt": "My favourite food is", "chosen": " fresh bread.", "rejected": " nothing at all."},
]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(LLAMA2_TOKENIZER)


def trainer(tmp_path, name, tok, bf16, accumulation):
    cfg = DPOConfig(output_dir=str(tmp_path / name), bf16=bf16, use_cpu=True, max_steps=2, logging_steps=1,
                    per_device_train_batch_size=2 // accumulation, gradient_accumulation_steps=accumulation,
                    disable_tqdm=True, learning_rate=1e-2, save_steps=0)
    return DPOTrainer(tiny_llama(vocab_size=32000), args=cfg, train_dataset=PAIRS, processing_class=tok)


def losses(t):
    t.train()
    return [r["loss"] for r in map(json.loads, (t.output_dir / "metrics.jsonl").read_text().splitlines())]


def test_bf16_and_fp32_runs_in_either_order_give_their_own_numbers(tmp_path, tok):
    fp32_first = losses(trainer(tmp_path, "a", tok, bf16=False, accumulation=2))
    bf16_after_fp32 = losses(trainer(tmp_path, "b", tok, bf16=True, accumulation=1))
    fp32_after_bf16 = losses(trainer(tmp_path, "c", tok, bf16=False, accumulation=2))
    bf16_after_both = losses(trainer(tmp_path, "d", tok, bf16=True, accumulation=1))
    assert fp32_after_bf16 == fp32_first
    assert bf16_after_both == bf16_after_fp32
    assert bf16_after_fp32 != fp32_first  # bf16 autocast really ran: its rounding shows in the losses
    # Two trainers alive at once: the one made first keeps its precision although the second replaced accelerate's.
    early = trainer(tmp_path, "e", tok, bf16=True, accumulation=1)
    late = trainer(tmp_path, "f", tok, bf16=False, accumulation=2)
    assert losses(early) == bf16_after_fp32
    assert losses(late) == fp32_first
