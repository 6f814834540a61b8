"""Likelihood displacement, read per pair against the reference: the training-time watch and `dpokit eval`'s note."""

import json

import pytest
import torch

from conftest import LLAMA2_TOKENIZER, tiny_llama
from dpokit import DPOConfig, DPOTrainer
from dpokit.evalmd import eval_markdown
from dpokit.evaluate import pair_metrics
from dpokit.metrics import DisplacementWatch

PAIRS = [
    {"prompt": "The weather today is", "chosen": " sunny and warm.", "rejected": " cold, grey and wet."},
    {"prompt": "My favourite food is", "chosen": " fresh bread.", "rejected": " nothing at all."},
    {"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " 5, probably"},
    {"prompt": "Say hello.", "chosen": "\nHello!", "rejected": "\nGo away."},
]


def test_training_logs_the_mean_per_pair_chosen_log_ratio(tmp_path):
    """`logratios/chosen` is the mean over pairs of policy_chosen_logps - ref_chosen_logps: for sigmoid, whose
    chosen reward is beta times that log-ratio, it is rewards/chosen / beta at every log."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(LLAMA2_TOKENIZER)
    args = DPOConfig(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, learning_rate=1e-2, max_steps=3,
                     logging_steps=1, save_steps=0, disable_tqdm=True, seed=0, beta=0.5)
    DPOTrainer(tiny_llama(vocab_size=32000), args=args, train_dataset=PAIRS, processing_class=tok).train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "rewards/chosen" in r]
    assert len(train) == 3
    for r in train:
        assert r["logratios/chosen"] == pytest.approx(r["rewards/chosen"] / 0.5, rel=1e-5, abs=1e-6)
    assert train[0]["logratios/chosen"] == 0.0  # step 1: the policy is its reference
    assert any(r["logratios/chosen"] != 0.0 for r in train[1:])


def test_the_watch_reads_the_log_ratio_not_the_batch_mean_log_prob():
    # The batch-mean log-prob falls log after log (longer completions), the per-pair log-ratio does not: silent.
    watch = DisplacementWatch(window=3)
    steady = [watch.update({"logps/chosen": -10.0 - 5 * i, "logratios/chosen": 0.1, "rewards/margins": 0.1 * i})
              for i in range(6)]
    assert steady == [None] * 6
    # The log-ratio falls while margins rise: it speaks, naming the per-pair log-ratio.
    watch = DisplacementWatch(window=3)
    said = [watch.update({"logps/chosen": -10.0, "logratios/chosen": -0.1 * i, "rewards/margins": 0.1 * i})
            for i in range(4)]
    assert said[:3] == [None] * 3 and "chosen log-ratio to the reference fell" in said[3]
    assert "0.000 -> -0.300 nats per pair" in said[3]
    # A loss without a reference logs no log-ratio: nothing to watch.
    assert DisplacementWatch(window=1).update({"logps/chosen": -3.0, "rewards/margins": 1.0}) is None


def _note(policy_chosen, ref_chosen):
    n = len(policy_chosen)
    m = pair_metrics(torch.tensor(policy_chosen), torch.full((n,), -9.0), torch.tensor(ref_chosen),
                     torch.full((n,), -9.0), beta=0.1)
    md = eval_markdown({"model": "m", "reference": "r", "beta": 0.1, "pairs": {"file": "p.jsonl", **m}})
    return m, "likelihood displacement" in md


def test_eval_notes_displacement_only_when_the_fall_exceeds_its_standard_error():
    # The mean chosen log-prob fell (-2.0 vs -1.975), but the per-pair differences (-0.5, +0.4) say nothing.
    m, noted = _note([-1.5, -2.5], [-1.0, -2.9])
    assert m["policy_chosen_logps"] < m["ref_chosen_logps"] and not noted
    assert m["chosen_logratio"] == pytest.approx(-0.05) and m["chosen_logratio_se"] == pytest.approx(0.45)
    # Every pair fell by about 0.5: far beyond its standard error.
    m, noted = _note([-1.5, -2.6, -3.4], [-1.0, -2.0, -3.0])
    assert m["chosen_logratio"] == pytest.approx(-0.5) and noted
    # One pair: no standard error, nothing can be said.
    assert not _note([-5.0], [-1.0])[1]
