"""Evaluation primitives: exact log-probs, the KL estimator against closed forms, pair metrics and win rate by hand."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import tiny_llama
from dpokit.errors import ConfigError, DataError
from dpokit.evaluate import (completion_ids, kl_from_samples, mean_and_se, pair_metrics, sample_completions,
                             sequence_logps, win_rate)

WORDS = ["a", "b", "c"]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def word_tokenizer(words=WORDS):
    """A word-level tokenizer (pad 0, BOS 1, EOS 2, unk 3, then `words`) that prepends BOS, like the demo's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + list(words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)


def iid_model(token_probs: dict, tok, seed=0):
    """A Llama whose next-token distribution ignores the context: logits = a fixed bias (zero head weights).

    Its sequence probabilities are products of `token_probs`, so log-probs and KLs have closed forms. Special tokens
    other than EOS get probability 0 (a sampled pad/unk would not survive decoding).
    """
    model = tiny_llama(vocab_size=len(tok), seed=seed)
    head = nn.Linear(model.config.hidden_size, len(tok), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-1e4)
        for word, p in token_probs.items():
            head.bias[tok.convert_tokens_to_ids(word)] = math.log(p)
    model.lm_head = head
    return model.eval()


P = {"a": 0.45, "b": 0.2, "c": 0.1, "</s>": 0.25}
Q = {"a": 0.2, "b": 0.3, "c": 0.25, "</s>": 0.25}


def test_sequence_logps_equal_closed_form_with_eos():
    tok = word_tokenizer()
    model = iid_model(P, tok)
    prompts = ["a b", "c", "a"]
    completions = [" a c", " b b b a", ""]  # the empty one is a sample that stopped at once: just EOS
    got = sequence_logps(model, tok, prompts, completions, batch_size=2)
    want = [math.log(P["a"] * P["c"] * P["</s>"]), math.log(P["b"] ** 3 * P["a"] * P["</s>"]), math.log(P["</s>"])]
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-5)


def test_sequence_logps_equal_full_logits_whatever_the_batching():
    """A real (random) tiny Llama: the chunked, padded, batched log-probs equal a plain one-row computation."""
    tok = word_tokenizer()
    model = tiny_llama(vocab_size=len(tok), seed=3).train()
    prompts = ["a", "b c a", "c c", "a b"]
    completions = [" b", " a a c b", " c", " b a"]
    expected = []
    for p, c in zip(prompts, completions):
        n = len(tok(p).input_ids)
        ids = torch.tensor([tok(p + c).input_ids + [tok.eos_token_id]])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None])
        expected.append(float(lp[n - 1:].sum()))
    for batch_size in (1, 3, 8):
        got = sequence_logps(model, tok, prompts, completions, batch_size=batch_size)
        torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-5, atol=1e-5)
    assert model.training  # scored in eval mode, then given back in the mode it came in


def test_completion_ids_follow_the_training_rule():
    tok = word_tokenizer()
    (p, c), (p2, c2) = completion_ids(tok, ["a b", "c"], [" c a", ""])
    assert p == [1, 4, 5] and c == [6, 4, 2]  # BOS a b | c a EOS
    assert p2 == [1, 6] and c2 == [2]
    with pytest.raises(DataError, match="2 prompts but 1 completions"):
        completion_ids(tok, ["a", "b"], [" c"])


def test_kl_estimator_on_categoricals_matches_closed_form():
    """Samples from p, scored under p and q: the estimate lands within a few standard errors of KL(p || q)."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    exact = float((p * (p / q).log()).sum())
    x = torch.multinomial(p, 20000, replacement=True, generator=torch.Generator().manual_seed(0))
    kl, se = kl_from_samples(p.log()[x], q.log()[x])
    spread = float(((p.log() - q.log()) ** 2 * p).sum() - exact ** 2) ** 0.5  # std of one term, closed form
    assert abs(kl - exact) < 4 * se
    assert se == pytest.approx(spread / math.sqrt(20000), rel=0.05)
    assert kl_from_samples([-1.0, -2.0], [-1.0, -2.0]) == (0.0, 0.0)


def test_sampled_sequence_kl_matches_closed_form():
    """End to end: sample_completions from P, sequence_logps under P and Q, the KL estimate vs the exact value.

    For context-free token distributions ending at EOS, KL(P || Q) over whole sequences is the expected number of
    tokens (EOS included, 1 / p_eos) times the per-token KL (Wald's identity).
    """
    tok = word_tokenizer()
    policy, ref = iid_model(P, tok), iid_model(Q, tok, seed=1)
    exact = sum(P[t] * math.log(P[t] / Q[t]) for t in P) / P["</s>"]
    samples = sample_completions(policy, tok, ["a", "b c"], num_samples=600, max_new_tokens=80, seed=0,
                                 batch_size=400)
    assert [len(s) for s in samples] == [600, 600]
    prompts = [p for p, group in zip(["a", "b c"], samples) for _ in group]
    flat = [c for group in samples for c in group]
    assert all(c == "" or (c.startswith(" ") and set(c.split()) <= set(WORDS)) for c in flat)
    kl, se = kl_from_samples(sequence_logps(policy, tok, prompts, flat, batch_size=400),
                             sequence_logps(ref, tok, prompts, flat, batch_size=400))
    assert abs(kl - exact) < 4 * se, (kl, se, exact)
    # The lengths follow the geometric law of P: mean 1/p_eos - 1 non-EOS tokens.
    mean_len, len_se = mean_and_se([len(c.split()) for c in flat])
    assert abs(mean_len - (1 / P["</s>"] - 1)) < 4 * len_se


def test_sampling_is_seeded_and_leaves_the_global_rng_alone():
    tok = word_tokenizer()
    model = tiny_llama(vocab_size=len(tok), seed=0)
    state = torch.get_rng_state()
    first = sample_completions(model, tok, ["a", "b"], num_samples=3, max_new_tokens=6, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert sample_completions(model, tok, ["a", "b"], num_samples=3, max_new_tokens=6, seed=7) == first
    assert sample_completions(model, tok, ["a", "b"], num_samples=3, max_new_tokens=6, seed=8) != first
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        sample_completions(model, tok, ["a"], temperature=0.0)


def test_pair_metrics_equal_hand_computed():
    pc, pr = [-1.0, -2.0, -3.0, -1.0], [-2.0, -2.0, -1.0, -4.0]
    rc, rr = [-1.5, -2.0, -2.0, -1.5], [-1.5, -2.0, -2.0, -2.5]
    m = pair_metrics(torch.tensor(pc), torch.tensor(pr), torch.tensor(rc), torch.tensor(rr), beta=0.5)
    chosen = [0.25, 0.0, -0.5, 0.25]  # 0.5 * (pc - rc)
    rejected = [-0.25, 0.0, 0.5, -0.75]  # 0.5 * (pr - rr)
    margins = [0.5, 0.0, -1.0, 1.0]
    assert m["accuracy"] == pytest.approx((1 + 0 + 0 + 1) / 4)  # the tie counts as wrong, as in training
    assert m["accuracy_se"] == pytest.approx(np.std([1, 0, 0, 1], ddof=1) / 2) and m["ties"] == 1
    assert m["chosen_logratio"] == pytest.approx(np.mean([0.5, 0.0, -1.0, 0.5]))  # pc - rc, per pair
    assert m["chosen_logratio_se"] == pytest.approx(np.std([0.5, 0.0, -1.0, 0.5], ddof=1) / 2)
    assert m["margin"] == pytest.approx(np.mean(margins))
    assert m["margin_se"] == pytest.approx(np.std(margins, ddof=1) / 2)
    assert m["chosen_reward"] == pytest.approx(np.mean(chosen))
    assert m["rejected_reward"] == pytest.approx(np.mean(rejected))
    assert m["policy_chosen_logps"] == pytest.approx(np.mean(pc)) and m["ref_rejected_logps"] == pytest.approx(-2.0)
    assert m["num_pairs"] == 4


def test_a_policy_equal_to_its_reference_ties_on_every_pair():
    c, r = torch.tensor([-3.0, -1.0, -2.0]), torch.tensor([-1.0, -4.0, -2.5])
    m = pair_metrics(c, r, c, r, beta=0.1)
    assert (m["accuracy"], m["accuracy_se"], m["ties"], m["margin"]) == (0.0, 0.0, 3, 0.0)


def test_eval_accuracy_counts_ties_as_training_and_trl_do():
    """`dpokit eval`'s accuracy and training's `rewards/accuracies` are one rule, TRL 1.16's
    `(chosen_rewards > rejected_rewards).float()`: a tie is wrong."""
    from dpokit.losses import preference_loss

    pc, pr = torch.tensor([-1.0, -2.0, -3.0, -1.0]), torch.tensor([-2.0, -2.0, -1.0, -4.0])
    rc, rr = torch.tensor([-1.5, -2.0, -2.0, -1.5]), torch.tensor([-1.5, -2.0, -2.0, -2.5])
    out = preference_loss("sigmoid", pc, pr, rc, rr, beta=0.5)
    trl = float((out.chosen_rewards > out.rejected_rewards).float().mean())
    assert pair_metrics(pc, pr, rc, rr, beta=0.5)["accuracy"] == trl == 0.5


def test_win_rate_counts_ties_as_half():
    rate, se = win_rate([3.0, 1.0, 2.0, 2.0], [1.0, 1.0, 3.0, 0.0])
    assert rate == pytest.approx(0.625)
    assert se == pytest.approx(np.std([1, 0.5, 0, 1], ddof=1) / 2)


def test_summaries_refuse_mismatched_or_empty_inputs():
    with pytest.raises(DataError, match="policy_scores has 2 values but ref_scores has 3"):
        win_rate([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(DataError, match="policy_logps is empty"):
        kl_from_samples([], [])
    with pytest.raises(DataError, match="2 policy pairs but 1 reference pairs"):
        pair_metrics([1.0, 2.0], [1.0, 2.0], [1.0], [1.0], beta=0.1)
    assert math.isnan(mean_and_se([2.0])[1])  # one value: no standard error
