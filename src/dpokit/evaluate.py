"""Evaluation primitives: sample completions, score them, and summarise with standard errors.

These are the measurements of the DPO paper's experiments, kept small and exact:

* `sample_completions`: seeded ancestral sampling (temperature / nucleus only; no top-k, no repetition penalty, none
  of the model's own generation defaults) so that the samples come from the distribution the arguments name;
* `sequence_logps`: log pi(completion | prompt) summed over the completion's tokens, EOS included, tokenized by the
  data layer's own rule (`dpokit.data.tokenize_sft`), so scoring sees the tokens training saw;
* `kl_from_samples`: the Monte-Carlo estimate of KL(pi || pi_ref) from samples of pi;
* `pair_metrics`: implicit-reward accuracy and margins on preference pairs;
* `win_rate`: paired comparison of per-item scores.

Every summary comes with its standard error (sample standard deviation / sqrt(n)), because on the small sets these
functions are run on a difference without one cannot be read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from dpokit.data.collate import pad_sequences
from dpokit.errors import ConfigError, DataError
from dpokit.evalmd import eval_markdown  # noqa: F401 (public: eval.json as eval.md)
from dpokit.logps import completion_logps
from dpokit.models import check_positions, load_merged, position_limit


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


@dataclass(frozen=True)
class Sample:
    """One sampled completion: its text (continuing the prompt), whether the model ended it with EOS (False: cut
    at max_new_tokens) and its length in sampled tokens."""

    text: str
    finished: bool
    num_tokens: int
    """Tokens the model sampled, EOS not counted."""


def draw_samples(model: nn.Module, tokenizer, prompts: Sequence, *, num_samples: int = 1, temperature: float = 1.0,
                 top_p: float = 1.0, max_new_tokens: int = 64, seed: int = 0, batch_size: int = 32
                 ) -> list[list[Sample]]:
    """`num_samples` sampled completions of each prompt: result[i][j] is sample j of prompts[i].

    A prompt is a text, or a message list, which is rendered by the tokenizer's chat template with the generation
    prompt (`dpokit.data.tokenize.prompt_ids`: the tokens training puts before a completion).

    Sampling is ancestral at `temperature`, with nucleus truncation only when `top_p` < 1. The model's own generation
    config (top-k, repetition penalty, ...) is deliberately not used: the samples must come from pi itself for a
    KL estimate or a reward mean to mean what it says. Generation stops at the tokenizer's EOS or after
    `max_new_tokens`; a sample cut by the limit has ``finished=False`` (`sequence_logps` would score it as finished,
    with an EOS it never sampled, so count or drop those, or raise `max_new_tokens`).

    The same seed, prompts, num_samples and batch_size give the same samples (the global RNG is left as it was).
    Completions are returned as text continuing the prompt, so that `prompt + completion` re-tokenizes to the sampled
    tokens (see `sequence_logps`); a special token sampled mid-text (pad, BOS) is dropped by decoding, as in any
    text-level evaluation.
    """
    from transformers import GenerationConfig

    from dpokit.data.tokenize import prompt_ids

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
    encoded = [prompt_ids(p, tokenizer, where=f"prompt {i + 1}") for i, p in enumerate(prompts)]
    bound = position_limit(getattr(model, "config", None))
    longest = max(range(len(encoded)), key=lambda i: len(encoded[i])) if encoded else None
    if bound is not None and longest is not None and len(encoded[longest]) + max_new_tokens > bound[0]:
        # Past its positions a model fails (learned positions) or samples out of distribution (rotary ones).
        raise ConfigError(f"prompt {longest + 1} has {len(encoded[longest])} tokens; with max_new_tokens="
                          f"{max_new_tokens} that is more than the model can place ({bound[1]}); use shorter "
                          "prompts or a smaller max_new_tokens")
    flat = [ids for ids in encoded for _ in range(num_samples)]
    samples: list[Sample] = []
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
                    finished = eos_id is not None and eos_id in generated
                    if finished:
                        generated = generated[:generated.index(eos_id)]
                    samples.append(Sample(_completion_text(tokenizer, row, generated), finished, len(generated)))
    finally:
        model.train(was_training)
    return [samples[i * num_samples:(i + 1) * num_samples] for i in range(len(prompts))]


def sample_completions(model: nn.Module, tokenizer, prompts: Sequence, **kwargs) -> list[list[str]]:
    """The texts of `draw_samples` (same arguments): result[i][j] is sample j of prompts[i]."""
    return [[s.text for s in group] for group in draw_samples(model, tokenizer, prompts, **kwargs)]


# --------------------------------------------------------------------------------------------------------------------
# Scoring


def completion_ids(tokenizer, prompts: Sequence, completions: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, EOS-terminated completion ids) of each pair, by exactly the rule training uses.

    The rule is `dpokit.data.tokenize_sft`'s (prompt ids = tokenizer(prompt).input_ids, completion ids = what
    tokenizer(prompt + completion) adds after them, then EOS; for a message-list prompt, the completion text is one
    assistant message and both are rendered by the chat template), so a completion is scored on the tokens the model
    was trained to produce. An empty completion (a sample that stopped at once) is just EOS; the data layer refuses empty
    completions in training data, so those are handled here.
    """
    from dpokit.data import SFTExample, tokenize_sft
    from dpokit.data.tokenize import prompt_ids

    if len(prompts) != len(completions):
        raise DataError(f"{len(prompts)} prompts but {len(completions)} completions")
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos_token; set one (completions are scored with their EOS)")
    nonempty = [i for i, c in enumerate(completions) if c]
    # A message-list prompt is answered by one assistant message, rendered by the chat template as in training.
    examples = [SFTExample(prompt=prompts[i], row=i, completion=completions[i] if isinstance(prompts[i], str)
                           else [{"role": "assistant", "content": completions[i]}]) for i in nonempty]
    tokenized = {ex.row: ex for ex in tokenize_sft(examples, tokenizer)}  # no length limit: nothing is cut
    out = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        if completion:
            ex = tokenized[i]
            out.append((ex.prompt_ids.tolist(), ex.completion_ids.tolist()))
        else:
            out.append((prompt_ids(prompt, tokenizer, where=f"prompt {i + 1}"), [tokenizer.eos_token_id]))
        if not out[-1][0]:
            raise DataError(f"prompt {str(prompt)[:50]!r} has no tokens (and the tokenizer adds no BOS): the first "
                            "completion token would have nothing to be predicted from")
    return out


def sequence_logps(model: nn.Module, tokenizer, prompts: Sequence, completions: Sequence[str], *,
                   batch_size: int = 32) -> torch.Tensor:
    """log pi(completion_i | prompt_i) summed over the completion's tokens and its EOS, float32 [N] on CPU.

    Tokenized as in training (`completion_ids`); computed in eval mode without gradients, in right-padded batches of
    `batch_size`.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1 (got {batch_size})")
    pad_id = _padding_id(tokenizer)
    device = _device(model)
    seqs, masks = [], []
    for p, c in completion_ids(tokenizer, prompts, completions):
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
    # Python numbers go straight to float64 (through the default float32 they would lose digits).
    t = values.detach().to("cpu", torch.float64) if isinstance(values, torch.Tensor) else \
        torch.as_tensor(np.asarray(values, dtype=np.float64))
    t = t.flatten()
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
    se = float(x.std(correction=1) / math.sqrt(n)) if n > 1 else float("nan")
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
    reward(rejected). Accuracy is the fraction of pairs with a positive margin, a tie (zero margin) counting as
    wrong, exactly as training's `rewards/accuracies` counts it (TRL's rule), so the two read alike on the same
    pairs; `ties` says how many there were (a policy identical to its reference ties on every pair: accuracy 0).

    `chosen_logratio` (with `_se`) is the mean over pairs of log pi(chosen) - log pi_ref(chosen): below zero by more
    than its standard error, the chosen completions became less likely than under the reference (likelihood
    displacement), a statement about the model, not about which pairs happened to be long.

    Returns accuracy, accuracy_se, ties, margin, margin_se, chosen_reward, rejected_reward, chosen_logratio,
    chosen_logratio_se, the four mean log-probs and num_pairs.
    """
    pc, pr = _paired(policy_chosen, policy_rejected, "policy_chosen", "policy_rejected")
    rc, rr = _paired(ref_chosen, ref_rejected, "ref_chosen", "ref_rejected")
    if rc.shape != pc.shape:
        raise DataError(f"{pc.numel()} policy pairs but {rc.numel()} reference pairs")
    chosen_reward = beta * (pc - rc)
    rejected_reward = beta * (pr - rr)
    margin = chosen_reward - rejected_reward
    accuracy, accuracy_se = mean_and_se((margin > 0).double())
    margin_mean, margin_se = mean_and_se(margin)
    logratio, logratio_se = mean_and_se(pc - rc)
    return {
        "accuracy": accuracy,
        "accuracy_se": accuracy_se,
        "ties": int((margin == 0).sum()),
        "margin": margin_mean,
        "margin_se": margin_se,
        "chosen_reward": float(chosen_reward.mean()),
        "rejected_reward": float(rejected_reward.mean()),
        "chosen_logratio": logratio,
        "chosen_logratio_se": logratio_se,
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


# --------------------------------------------------------------------------------------------------------------------
# Judges: how a sampled completion is scored for the win rate


def check_judge(spec: str) -> None:
    """Refuse a judge spec that cannot work (not a known form, a module or function that does not import, a path that
    is no reward model) with `load_judge`'s own resolution, loading and calling nothing: commands check it before
    they train or load a model, so a typo costs no run."""
    load_judge(spec, check=True)


def load_judge(spec: str, *, policy: nn.Module = None, reference: nn.Module = None, tokenizer=None,
               beta: float = 0.1, batch_size: int = 16, check: bool = False):
    """A scorer `score(prompts, completions) -> list[float]` from a spec:

    * `implicit` — the DPO implicit reward beta * (log pi(y|x) - log pi_ref(y|x)) of the policy being evaluated;
    * `module:function` or `path/to/file.py:function` — a Python function `function(prompt, completion) -> float`
      (`dpokit.plugins`: a module is found in the current directory too; the prompt is the text, or the message list,
      exactly as given);
    * `rm:PATH` (or a PATH whose config is a `...ForSequenceClassification`) — a reward model; the score is its
      single logit on prompt + completion (a message-list prompt and its answer rendered by the reward model's chat
      template).
    """
    from pathlib import Path

    from dpokit import plugins
    from dpokit.fileio import read_json

    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("judge: empty spec; use 'implicit', 'module:function' or 'rm:PATH'")
    spec = spec.strip()
    if spec == "implicit":
        if check:
            return None
        if policy is None or reference is None:
            raise ConfigError("judge 'implicit' needs the policy and its reference")

        def implicit(prompts, completions):
            lp = sequence_logps(policy, tokenizer, prompts, completions, batch_size=batch_size)
            lr = sequence_logps(reference, tokenizer, prompts, completions, batch_size=batch_size)
            scores = beta * (lp - lr)
            if not torch.isfinite(scores).all():
                raise ConfigError("judge 'implicit' gave a non-finite score (the policy or reference log-probs are "
                                  "not finite)")
            return scores.tolist()

        return implicit
    path = Path(spec[3:] if spec.startswith("rm:") else spec)
    if spec.startswith("rm:") or (path / "config.json").is_file():
        if not (path / "config.json").is_file():
            raise ConfigError(f"judge {spec!r}: {path} has no config.json (not a reward model directory)")
        config = read_json(path / "config.json")
        arch = (config.get("architectures") if isinstance(config, dict) else None) or []
        if not any(a.endswith("ForSequenceClassification") for a in arch):
            raise ConfigError(f"judge {spec!r}: {path} is a {arch or 'model without architectures'}, "
                              "not a ...ForSequenceClassification reward model")
        if check:
            return None
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from dpokit.models import MODEL_FILES, TOKENIZER_FILES, loading

        with loading("reward model", path, MODEL_FILES + TOKENIZER_FILES, weights=True):
            rm = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
            rm_tok = AutoTokenizer.from_pretrained(str(path))
        if rm.config.num_labels != 1:
            raise ConfigError(f"judge {spec!r}: a reward model must have one output (num_labels=1), "
                              f"this one has {rm.config.num_labels}")
        if rm_tok.pad_token_id is None:
            rm_tok.pad_token = rm_tok.eos_token  # any id: padding is re-marked per batch below

        def rm_text(prompt, completion) -> tuple[str, bool]:
            """The reward model's input and whether to add special tokens: prompt + completion as text, or the
            conversation rendered by the reward model's own chat template (which writes its special tokens)."""
            if isinstance(prompt, str):
                return prompt + completion, True
            if not getattr(rm_tok, "chat_template", None):
                raise ConfigError(f"judge {spec!r}: the prompts are conversations, but the reward model's tokenizer "
                                  "has no chat template to render them with")
            return rm_tok.apply_chat_template(prompt + [{"role": "assistant", "content": completion}],
                                              tokenize=False), False

        @torch.no_grad()
        def reward_model(prompts, completions):
            scores = []
            for start in range(0, len(prompts), batch_size):
                inputs = [rm_text(p, c) for p, c in zip(prompts[start:start + batch_size],
                                                         completions[start:start + batch_size])]
                # Each text with its own rule (a prompts file may mix text and message prompts), then padded.
                enc = rm_tok.pad({"input_ids": [rm_tok(t, add_special_tokens=special).input_ids
                                                for t, special in inputs]}, return_tensors="pt")
                # A decoder reward model scores each sequence at its last token that is not pad_token_id. When the
                # pad id is also a real token (a tokenizer without a pad token pads with EOS, and chat templates end
                # a turn with EOS) that token would be skipped, so padding gets an id no sequence of the batch holds.
                ids, mask = enc["input_ids"], enc["attention_mask"]
                limit = getattr(rm.config, "max_position_embeddings", None)
                if limit is not None and ids.shape[1] > limit:
                    # Scored on a cut text, the reward would describe something else; nobody would be told.
                    raise ConfigError(f"judge {spec!r}: a prompt + completion of {int(mask.sum(1).max())} tokens is "
                                      f"longer than the reward model's max_position_embeddings ({limit}); use shorter "
                                      "prompts or max_new_tokens")
                used = set(ids[mask.bool()].tolist())
                free = next((i for i in range(rm.get_input_embeddings().num_embeddings) if i not in used), None)
                if free is None:  # every id of the vocabulary occurs: score the sequences one by one, unpadded
                    for row, m in zip(ids, mask):
                        rm.config.pad_token_id = None
                        scores.append(rm(input_ids=row[m.bool()][None]).logits[0, 0].float().item())
                    continue
                rm.config.pad_token_id = free
                scores += rm(input_ids=ids.masked_fill(mask == 0, free), attention_mask=mask).logits[:, 0].float().tolist()
            return scores

        return reward_model
    if plugins.split(spec) is None:
        raise ConfigError(f"judge {spec!r}: not 'implicit', 'module:function', 'path/to/file.py:function' or "
                          "'rm:PATH'")
    fn = plugins.load_callable(spec, "judge")
    if check:
        return None

    def python_judge(prompts, completions):
        scores = []
        for p, c in zip(prompts, completions):
            try:
                value = fn(p, c)
            except Exception as exc:  # the user's code: named in one line (--debug shows the traceback)
                raise ConfigError(f"judge {spec!r} raised {type(exc).__name__}: {exc} (on completion "
                                  f"{c[:40]!r})") from exc
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"judge {spec!r} returned {value!r} for a completion; it must return a finite float")
            scores.append(float(value))
        return scores

    return python_judge


# --------------------------------------------------------------------------------------------------------------------
# `dpokit eval`: a trained model against its reference


def run_settings(path) -> dict:
    """The resolved config a dpokit run left in its directory (empty for a plain model); a damaged one is a one-line
    error naming it, not a model evaluated with guessed settings."""
    from pathlib import Path

    from dpokit.fileio import read_yaml

    f = Path(path) / "dpokit_config.yaml"
    return read_yaml(f) if f.is_file() else {}


def default_reference(path) -> str:
    """The reference a run was trained against: its ref_model_name_or_path, else the model it started from."""
    from pathlib import Path

    if not Path(path).exists():
        raise ConfigError(f"model {str(path)!r}: no such directory")
    settings = run_settings(path)
    ref = settings.get("ref_model_name_or_path") or settings.get("model_name_or_path")
    if not ref:
        raise ConfigError(f"{path}: not a dpokit run directory (no dpokit_config.yaml naming its starting model); "
                          "pass --ref")
    return ref


def tokenized_pairs(pairs_source, tokenizer, *, max_length=None):
    """(examples, tokenized pairs, report) of a preference file, read and tokenized as in training."""
    from dpokit import data as D

    rows, name = D.load_rows(pairs_source)
    examples, report = D.preference_examples(rows, name, chat_template_available=bool(tokenizer.chat_template))
    return examples, D.tokenize_preference(examples, tokenizer, max_length=max_length, report=report), report


def pair_logps(model, tokenizer, pairs_source, *, max_length=None, batch_size=16):
    """Summed completion log-probs of chosen and rejected for every usable pair of a file, tokenized as in training."""
    _, pairs, report = tokenized_pairs(pairs_source, tokenizer, max_length=max_length)
    chosen, rejected = tokenized_pair_logps(model, pairs, tokenizer.pad_token_id, batch_size=batch_size, report=report,
                                            max_length=max_length)
    return chosen, rejected, report


def tokenized_pair_logps(model, pairs, pad_id: int, *, batch_size=16, report=None, max_length=None,
                         what: str = "the model") -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs of chosen and rejected of `tokenize_preference`'s pairs, float32 [N] each. A pair
    longer than the model can place is refused first, as in training, naming its row (`report`: where the pairs were
    read)."""
    from dpokit.data.collate import collate_pairs

    if not pairs:
        return torch.zeros(0), torch.zeros(0)
    if report is not None:
        check_positions(getattr(model, "config", None), {"pairs": pairs}, {"pairs": report}, max_length, what=what)
    chosen, rejected = [], []
    device = _device(model)
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            batch = collate_pairs(pairs[start:start + batch_size], pad_id)
            out = completion_logps(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                   batch["completion_mask"].to(device))
            b = len(batch["row"])
            chosen.append(out.logps[:b].float().cpu())
            rejected.append(out.logps[b:].float().cpu())
    return torch.cat(chosen), torch.cat(rejected)


def read_prompts(source, column_map=None, tokenizer=None) -> list:
    """The distinct prompts of a file (`dpokit.data.prompt_examples`, every row validated), as the model with
    `tokenizer` is given them (`PromptExample.for_model`): texts or message lists."""
    from dpokit import data as D

    rows, name = D.load_rows(source)
    examples, _ = D.prompt_examples(rows, name, column_map=column_map)
    return [e.for_model(tokenizer) for e in examples]


def prompt_text(prompt) -> str:
    """A prompt for a person to read: the text, or the messages as ``role: content`` lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def evaluate_model(model_path, *, ref_path=None, pairs=None, prompts=None, judge=None, output_dir=None,
                   beta=None, num_samples=4, temperature=1.0, top_p=1.0, max_new_tokens=64, seed=0, batch_size=16,
                   max_length=None, show=4, save_samples=None) -> dict:
    """Everything `dpokit eval` reports; writes eval.json and eval.md into `output_dir` (default: the model's dir).

    `save_samples` (a .jsonl path) also writes every sample pair: prompt, the policy's and the reference's sample j
    of it (same seed), the judge's scores and where eval.json went, for people to compare blind
    (`dpokit annotate serve`), whose win rate `dpokit annotate export` adds to eval.json."""
    import json as _json
    from pathlib import Path

    from dpokit.fileio import atomic_write_text, refuse_overlap, writing

    if pairs is None and prompts is None:
        raise ConfigError("nothing to evaluate: give --pairs and/or --prompts")
    if prompts is not None and judge is None:
        raise ConfigError("--prompts needs --judge (implicit, module:function or rm:PATH) to compare samples")
    if save_samples is not None and prompts is None:
        raise ConfigError("--save_samples saves the samples of --prompts; give --prompts and --judge")
    if save_samples is not None and not str(save_samples).endswith((".jsonl", ".jsonl.gz")):
        raise ConfigError(f"--save_samples {save_samples}: must be a .jsonl file")
    ref_path = ref_path or default_reference(model_path)
    if Path(ref_path).exists() and Path(ref_path).resolve() == Path(model_path).resolve():
        # Every margin, win rate and KL would be 0 against itself, which reads as "no change", not as a mistake.
        raise ConfigError(f"the reference {ref_path} is the policy itself; pass --ref with the model the run started "
                          "from (or a run directory whose dpokit_config.yaml names it)")
    out = Path(output_dir or model_path)
    judge_file = judge[len("rm:"):] if isinstance(judge, str) and judge.startswith("rm:") else None
    refuse_overlap({"--output_dir's eval.json": out / "eval.json", "--output_dir's eval.md": out / "eval.md",
                    "--save_samples": save_samples},
                   {"--pairs": pairs, "--prompts": prompts, "--ref": ref_path, "the judge": judge_file},
                   hosts={"the evaluated model": model_path}, own=("eval.json", "eval.md"))
    settings = run_settings(model_path)
    beta = float(beta if beta is not None else settings.get("beta", 0.1))
    if prompts is not None:
        # Refused before any model loads: a judge that cannot work, a prompts file with a bad row.
        check_judge(judge)
        read_prompts(prompts)
    policy, tokenizer = load_merged(model_path)
    reference, _ = load_merged(ref_path)
    result = {"model": str(model_path), "reference": str(ref_path), "beta": beta}
    if pairs is not None:
        pc, pr, report = pair_logps(policy, tokenizer, pairs, max_length=max_length, batch_size=batch_size)
        rc, rr, _ = pair_logps(reference, tokenizer, pairs, max_length=max_length, batch_size=batch_size)
        result["pairs"] = {"file": str(pairs), **pair_metrics(pc, pr, rc, rr, beta), "data": report.summary()}
    if prompts is not None:
        texts = read_prompts(prompts, tokenizer=tokenizer)
        score = load_judge(judge, policy=policy, reference=reference, tokenizer=tokenizer, beta=beta,
                           batch_size=batch_size)
        kw = dict(num_samples=num_samples, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                  seed=seed, batch_size=batch_size)
        pol_samples = draw_samples(policy, tokenizer, texts, **kw)
        ref_samples = draw_samples(reference, tokenizer, texts, **kw)
        pol = [[x.text for x in group] for group in pol_samples]
        ref = [[x.text for x in group] for group in ref_samples]
        flat_p = [p for p, s in zip(texts, pol) for _ in s]
        pol_flat = [c for s in pol for c in s]
        ref_flat = [c for s in ref for c in s]
        kl, kl_se = kl_from_samples(sequence_logps(policy, tokenizer, flat_p, pol_flat, batch_size=batch_size),
                                    sequence_logps(reference, tokenizer, flat_p, pol_flat, batch_size=batch_size))
        pol_scores, ref_scores = score(flat_p, pol_flat), score(flat_p, ref_flat)
        rate, rate_se = win_rate(pol_scores, ref_scores)
        pol_mean, pol_se = mean_and_se(pol_scores)
        ref_mean, ref_se = mean_and_se(ref_scores)
        pol_len, _ = mean_and_se([x.num_tokens for g in pol_samples for x in g])
        ref_len, _ = mean_and_se([x.num_tokens for g in ref_samples for x in g])
        result["samples"] = {
            "file": str(prompts), "judge": judge, "num_prompts": len(texts), "num_samples": num_samples,
            "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed,
            "win_rate": rate, "win_rate_se": rate_se, "policy_score": pol_mean, "policy_score_se": pol_se,
            "reference_score": ref_mean, "reference_score_se": ref_se, "kl": kl, "kl_se": kl_se,
            "policy_mean_tokens": pol_len, "reference_mean_tokens": ref_len,
            # Samples cut at max_new_tokens are scored as if finished (with an EOS never sampled): counted.
            "policy_unfinished": sum(not x.finished for g in pol_samples for x in g),
            "reference_unfinished": sum(not x.finished for g in ref_samples for x in g),
            "examples": [{"prompt": prompt_text(texts[i]), "policy": pol[i][0], "reference": ref[i][0]}
                         for i in range(min(show, len(texts)))],
        }
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    if save_samples is not None:
        from dpokit.data.tools import write_jsonl

        flat_j = [(i, j) for i, group in enumerate(pol) for j in range(len(group))]
        every = [{"prompt_index": i, "sample": j, "prompt": texts[i], "policy": pol[i][j], "reference": ref[i][j],
                  "policy_score": ps, "reference_score": rs, "policy_finished": pol_samples[i][j].finished,
                  "reference_finished": ref_samples[i][j].finished}
                 for (i, j), ps, rs in zip(flat_j, pol_scores, ref_scores)]
        write_jsonl([{**row, "model": str(model_path), "reference_model": str(ref_path), "eval_dir": str(out.resolve())}
                     for row in every], str(save_samples))
        # Asked to keep the samples, eval.json keeps them all too (not only the `show` examples eval.md lists), so
        # the record of the evaluation holds every number it summarises.
        result["samples"]["saved_to"] = str(save_samples)
        result["samples"]["all_samples"] = every
    atomic_write_text(out / "eval.json", _json.dumps(result, indent=2))
    atomic_write_text(out / "eval.md", eval_markdown(result))
    result["written_to"] = str(out)
    return result


def main(argv: list[str]) -> int:
    """`dpokit eval`: every option's range is checked as it is read, before any model loads."""
    from pathlib import Path

    from dpokit.cli import COMMANDS
    from dpokit.fileio import read_text
    from dpokit.options import Parser, positive_float, positive_int, seed, top_p

    parser = Parser(prog="dpokit eval", description=COMMANDS["eval"])
    parser.add_argument("--model", required=True, help="a run directory (full model or LoRA adapter) or a model path")
    # The model and --output_dir are checked by evaluate_model: its eval.json and eval.md go into the model's
    # directory by default, beside (never over) the files of the run.
    parser.add_argument("--ref", reads=True, help="the reference model (default: the model the run started from)")
    parser.add_argument("--pairs", reads=True,
                        help="held-out preference pairs: implicit-reward accuracy, margins, log-probs")
    parser.add_argument("--prompts", reads=True, help="prompts to sample from policy and reference: win rate and KL")
    parser.add_argument("--judge", help="implicit | module:function | rm:PATH (reward model) — scores samples")
    parser.add_argument("--output_dir", help="where eval.json and eval.md go (default: the model's directory)")
    parser.add_argument("--beta", type=positive_float, help="beta of the implicit reward (default: the run's)")
    parser.add_argument("--num_samples", type=positive_int, default=4, help="samples per prompt and model")
    parser.add_argument("--temperature", type=positive_float, default=1.0)
    parser.add_argument("--top_p", type=top_p, default=1.0)
    parser.add_argument("--max_new_tokens", type=positive_int, default=64)
    parser.add_argument("--seed", type=seed, default=0, help="sampling seed (the same for policy and reference)")
    parser.add_argument("--batch_size", type=positive_int, default=16)
    parser.add_argument("--max_length", type=positive_int,
                        help="truncate pairs as in training (dropped pairs are counted)")
    parser.add_argument("--save_samples", metavar="FILE.jsonl", writes=True,
                        help="also save every policy/reference sample pair, for a blind human A/B (dpokit annotate)")
    args = parser.parse_args(argv)
    result = evaluate_model(args.model, ref_path=args.ref, pairs=args.pairs, prompts=args.prompts, judge=args.judge,
                            output_dir=args.output_dir, beta=args.beta, num_samples=args.num_samples,
                            temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                            seed=args.seed, batch_size=args.batch_size, max_length=args.max_length, save_samples=args.save_samples)
    print(read_text(Path(result["written_to"]) / "eval.md"))
    return 0
