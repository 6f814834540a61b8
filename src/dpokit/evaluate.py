"""Evaluation primitives: sample completions, score them, and summarise with standard errors.

These are the measurements of the DPO paper's experiments, kept small and exact:

* `sample_completions`: seeded ancestral sampling (temperature / nucleus only; no top-k, no repetition penalty, none
  of the model's own generation defaults) so that the samples come from the distribution the arguments name;
* `sequence_logps`: log pi(completion | prompt) summed over the completion's tokens, EOS included, tokenized by the
  same rule the data layer uses for training;
* `kl_from_samples`: the Monte-Carlo estimate of KL(pi || pi_ref) from samples of pi;
* `pair_metrics`: implicit-reward accuracy and margins on preference pairs;
* `win_rate`: paired comparison of per-item scores.

Every summary comes with its standard error (sample standard deviation / sqrt(n)), because on the small sets these
functions are run on a difference without one cannot be read.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from dpokit.data.collate import pad_sequences
from dpokit.errors import ConfigError, DataError
from dpokit.logps import completion_logps


# --------------------------------------------------------------------------------------------------------------------
# Sampling


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _padding_id(tokenizer) -> int:
    # Padding positions are masked out (attention_mask 0) and cut from the output, so their id never matters; a
    # tokenizer without a pad token (Llama's) pads with EOS, as transformers' own generate does.
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ConfigError("the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token")
    return pad


def _left_padded(rows: Sequence[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists (generation appends on the right, so every prompt must end at the same column)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def _completion_text(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """Decoded text of `new_ids` as it continues the prompt, leading space included.

    Decoding the new tokens alone loses the space that joins them to the prompt for many tokenizers (word-level and
    SentencePiece ones strip it), and then prompt + completion would not re-tokenize to the sampled tokens. So decode
    prompt and prompt+completion and take the difference.
    """
    prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    full_text = tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    if not full_text.startswith(prompt_text):
        raise DataError(f"decoding is not prefix-stable for this tokenizer: {full_text[:60]!r} does not start with "
                        f"the decoded prompt {prompt_text[:60]!r}")
    return full_text[len(prompt_text):]


def sample_completions(model: nn.Module, tokenizer, prompts: Sequence[str], *, num_samples: int = 1,
                       temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 64, seed: int = 0,
                       batch_size: int = 32) -> list[list[str]]:
    """`num_samples` sampled completions of each prompt: result[i][j] is sample j of prompts[i].

    Sampling is ancestral at `temperature`, with nucleus truncation only when `top_p` < 1. The model's own generation
    config (top-k, repetition penalty, ...) is deliberately not used: the samples must come from pi itself for a
    KL estimate or a reward mean to mean what it says. Generation stops at EOS or after `max_new_tokens`.

    The same seed, prompts, num_samples and batch_size give the same samples (the global RNG is left as it was).
    Completions are returned as text continuing the prompt, so that `prompt + completion` re-tokenizes to the sampled
    tokens (see `sequence_logps`).
    """
    from transformers import GenerationConfig

    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0 for sampling (got {temperature})")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1] (got {top_p})")
    if num_samples < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ConfigError(f"num_samples, max_new_tokens and batch_size must be >= 1 "
                          f"(got {num_samples}, {max_new_tokens}, {batch_size})")
    device = _device(model)
    pad_id = _padding_id(tokenizer)
    eos_id = tokenizer.eos_token_id
    gen_config = GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                                  max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id,
                                  bos_token_id=tokenizer.bos_token_id)
    # Prompt-major order: sample j of prompt i is flat row i * num_samples + j.
    flat = [tokenizer(p).input_ids for p in prompts for _ in range(num_samples)]
    texts: list[str] = []
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            for start in range(0, len(flat), batch_size):
                rows = flat[start:start + batch_size]
                ids, mask = _left_padded(rows, pad_id, device)
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_config)
                for row, generated in zip(rows, out[:, ids.shape[1]:].tolist()):
                    # Everything after the first EOS is padding added for the longer rows of the batch.
                    if eos_id is not None and eos_id in generated:
                        generated = generated[:generated.index(eos_id)]
                    texts.append(_completion_text(tokenizer, row, generated))
    finally:
        model.train(was_training)
    return [texts[i * num_samples:(i + 1) * num_samples] for i in range(len(prompts))]


# --------------------------------------------------------------------------------------------------------------------
# Scoring


def completion_token_ids(tokenizer, prompt: str, completion: str, *, add_eos: bool = True) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) by the data layer's rule.

    Prompt ids are `tokenizer(prompt).input_ids`; completion ids are what `tokenizer(prompt + completion)` adds after
    them, so the boundary is tokenized as the model saw it in one piece. With `add_eos` the completion ends with EOS,
    as in training and as a finished sample does, so its probability includes the decision to stop.
    """
    prompt_ids = tokenizer(prompt).input_ids
    full_ids = tokenizer(prompt + completion).input_ids
    if full_ids[:len(prompt_ids)] != prompt_ids:
        raise DataError(f"prompt {prompt[:50]!r} tokenizes differently when followed by its completion "
                        f"{completion[:30]!r}; start the completion at a token boundary (e.g. with a space)")
    completion_ids = full_ids[len(prompt_ids):]
    eos = tokenizer.eos_token_id
    if add_eos and eos is not None and (not completion_ids or completion_ids[-1] != eos):
        completion_ids = completion_ids + [eos]
    if not prompt_ids:
        raise DataError(f"prompt {prompt[:50]!r} has no tokens (and the tokenizer adds no BOS): the first completion "
                        "token would have nothing to be predicted from")
    return prompt_ids, completion_ids


def sequence_logps(model: nn.Module, tokenizer, prompts: Sequence[str], completions: Sequence[str], *,
                   batch_size: int = 32, add_eos: bool = True) -> torch.Tensor:
    """log pi(completion_i | prompt_i) summed over completion tokens (EOS included with `add_eos`), float32 [N] on CPU.

    Computed in eval mode without gradients, in right-padded batches of `batch_size`.
    """
    if len(prompts) != len(completions):
        raise DataError(f"{len(prompts)} prompts but {len(completions)} completions")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1 (got {batch_size})")
    pad_id = _padding_id(tokenizer)
    device = _device(model)
    seqs, masks = [], []
    for prompt, completion in zip(prompts, completions):
        p, c = completion_token_ids(tokenizer, prompt, completion, add_eos=add_eos)
        seqs.append(np.asarray(p + c, dtype=np.int64))
        masks.append(np.concatenate([np.zeros(len(p), np.int64), np.ones(len(c), np.int64)]))
    out = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(seqs), batch_size):
                batch = pad_sequences(seqs[start:start + batch_size], masks[start:start + batch_size], pad_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                out.append(completion_logps(model, batch["input_ids"], batch["attention_mask"],
                                            batch["completion_mask"]).logps.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


# --------------------------------------------------------------------------------------------------------------------
# Summaries


def _as_float64(values, name: str) -> torch.Tensor:
    t = torch.as_tensor(values).detach().to("cpu", torch.float64).flatten()
    if t.numel() == 0:
        raise DataError(f"{name} is empty")
    return t


def _paired(a, b, name_a: str, name_b: str) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _as_float64(a, name_a), _as_float64(b, name_b)
    if a.shape != b.shape:
        raise DataError(f"{name_a} has {a.numel()} values but {name_b} has {b.numel()}")
    return a, b


def mean_and_se(values) -> tuple[float, float]:
    """Mean and standard error (sample std with n-1, over sqrt n); the error is NaN for a single value."""
    x = _as_float64(values, "values")
    n = x.numel()
    se = float(x.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return float(x.mean()), se


def kl_from_samples(policy_logps, ref_logps) -> tuple[float, float]:
    """KL(pi || pi_ref) estimated from samples y ~ pi: mean and standard error of log pi(y) - log pi_ref(y).

    Unbiased for the sequence-level KL when every y was drawn from pi (and scored whole, EOS included); individual
    terms can be negative, the mean is not in expectation.
    """
    p, r = _paired(policy_logps, ref_logps, "policy_logps", "ref_logps")
    return mean_and_se(p - r)


def _half_ties(diff: torch.Tensor) -> torch.Tensor:
    """1 where diff > 0, 1/2 where diff == 0, 0 where diff < 0."""
    return (diff > 0).double() + 0.5 * (diff == 0).double()


def pair_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> dict[str, float]:
    """Implicit-reward statistics of preference pairs (all inputs: summed log-probs, one value per pair).

    The implicit reward of a completion is beta * (log pi - log pi_ref); the margin of a pair is reward(chosen) -
    reward(rejected). Accuracy is the fraction of pairs with a positive margin, a zero margin counting one half: a
    policy identical to its reference has every margin exactly 0 and so scores 0.5, chance, by construction (TRL's
    `rewards/accuracies` counts such ties as wrong and would report 0).

    Returns accuracy, accuracy_se, margin, margin_se, chosen_reward, rejected_reward, the four mean log-probs and
    num_pairs.
    """
    pc, pr = _paired(policy_chosen, policy_rejected, "policy_chosen", "policy_rejected")
    rc, rr = _paired(ref_chosen, ref_rejected, "ref_chosen", "ref_rejected")
    if rc.shape != pc.shape:
        raise DataError(f"{pc.numel()} policy pairs but {rc.numel()} reference pairs")
    chosen_reward = beta * (pc - rc)
    rejected_reward = beta * (pr - rr)
    margin = chosen_reward - rejected_reward
    accuracy, accuracy_se = mean_and_se(_half_ties(margin))
    margin_mean, margin_se = mean_and_se(margin)
    return {
        "accuracy": accuracy,
        "accuracy_se": accuracy_se,
        "margin": margin_mean,
        "margin_se": margin_se,
        "chosen_reward": float(chosen_reward.mean()),
        "rejected_reward": float(rejected_reward.mean()),
        "policy_chosen_logps": float(pc.mean()),
        "policy_rejected_logps": float(pr.mean()),
        "ref_chosen_logps": float(rc.mean()),
        "ref_rejected_logps": float(rr.mean()),
        "num_pairs": pc.numel(),
    }


def win_rate(policy_scores, ref_scores) -> tuple[float, float]:
    """Fraction of items where the policy's score beats the reference's (ties count one half), with standard error.

    The scores are paired: item i of each list belongs to the same prompt.
    """
    p, r = _paired(policy_scores, ref_scores, "policy_scores", "ref_scores")
    return mean_and_se(_half_ties(p - r))
