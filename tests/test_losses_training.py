"""Every registered loss trains: a short run on a tiny model ends with a finite loss and higher pair accuracy."""

import math

import pytest

from conftest import LLAMA2_TOKENIZER, tiny_llama
from dpokit import DPOConfig, DPOTrainer
from dpokit.losses import LOSS_TYPES

PAIRS = [
    {"prompt": f"Review {i}: the film was", "chosen": " great fun, I loved it.", "rejected": " dull and far too long."}
    for i in range(4)
] + [
    {"prompt": f"Answer {i}: the capital of France is", "chosen": " Paris.", "rejected": " a large cheese."}
    for i in range(4)
]

EXTRA = {
    "robust": {"label_smoothing": 0.1},
    "exo_pair": {"label_smoothing": 1e-3},
    # DiscoPOP is not monotone at zero margin: with the paper's tau = 0.05 its gradient there *lowers* the margin
    # (test_losses checks that property). From a policy equal to its reference, training can only be shown to
    # separate pairs with a temperature at which the logistic part dominates near zero.
    "discopop": {"discopop_tau": 1.0},
}


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(LLAMA2_TOKENIZER)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_short_run_raises_accuracy(loss_type, tok, tmp_path):
    args = DPOConfig(output_dir=str(tmp_path), loss_type=loss_type, beta=0.1, learning_rate=3e-3, max_steps=12,
                     per_device_train_batch_size=8, per_device_eval_batch_size=8, logging_steps=1, save_steps=0,
                     disable_tqdm=True, seed=0, **EXTRA.get(loss_type, {}))
    trainer = DPOTrainer(tiny_llama(vocab_size=32000), args=args, train_dataset=PAIRS, eval_dataset=PAIRS,
                         processing_class=tok)
    before = trainer.evaluate()
    last = trainer.train().metrics
    after = trainer.evaluate()
    assert math.isfinite(last["loss"])
    assert after["eval_rewards/accuracies"] > before["eval_rewards/accuracies"] or \
        after["eval_rewards/accuracies"] == 1.0, (before, after)
    assert after["eval_rewards/margins"] > before["eval_rewards/margins"], (before, after)
