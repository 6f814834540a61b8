"""`dpokit demo`: a miniature of the DPO paper's controlled-sentiment experiment (Rafailov et al. 2023, section 6.1).

The paper fine-tunes GPT-2 on IMDb reviews, then uses DPO to make it continue review prefixes positively, and plots
reward (a sentiment classifier's score) against KL to the SFT model. This demo runs the same pipeline at toy scale on
a few CPU cores with no downloads:

1. **Corpus.** A seeded template grammar writes one-sentence story openings ("one morning , the old fisherman walked
   to the harbor .") and one-sentence continuations that are either positive ("the harbor was wonderful and he felt
   happy .") or negative (the same template with "terrible" and "sad"). Prompts are split into train and held-out.
2. **Tokenizer and model.** A word-level tokenizer over the grammar's words (the `tokenizers` library, wrapped as a
   `PreTrainedTokenizerFast` with BOS/EOS/pad/unk) and a tiny `LlamaForCausalLM` built from a config.
3. **SFT** on every train prompt with one positive and one negative continuation: the SFT model writes positive and
   negative continuations about equally often, so its mean reward is about 0.5.
4. **DPO** on pairs (prompt, positive continuation, negative continuation) over the train prompts, the SFT model as
   reference.
5. **Evaluation** on held-out prompts, before (SFT) and after (DPO), with the same seed and the same prompts, sampling
   at temperature 1 (never greedy, which would hide the spread of the distribution):
   * reward: the sentiment-lexicon score of each sampled continuation (`sentiment_reward`), averaged;
   * KL(pi || pi_SFT), estimated from the policy's own samples as the mean of log pi(y) - log pi_SFT(y);
   * preference accuracy on held-out pairs: the fraction with a positive implicit-reward margin
     beta * [(log pi - log pi_SFT)(chosen) - (log pi - log pi_SFT)(rejected)], ties counting one half. The SFT model
     is its own reference, so every margin is exactly 0 and it scores 0.5 (chance) by construction.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

# --------------------------------------------------------------------------------------------------------------------
# The grammar. Text is kept in the tokenizer's canonical form (lower case, every word and punctuation mark separated by
# one space) so that decoding a sample and re-encoding it gives back the same tokens.

OPENINGS = ("once upon a time ,", "one morning ,", "late at night ,", "in the spring ,", "after a long day ,",
            "on a cold evening ,", "years ago ,", "last summer ,", "at dawn ,", "on a sunday ,")
SUBJECTS = (("the old fisherman", "he"), ("the young princess", "she"), ("a tired farmer", "he"),
            ("the little girl", "she"), ("a brave sailor", "he"), ("the baker", "she"), ("my grandmother", "she"),
            ("the new teacher", "he"), ("a quiet student", "she"), ("the village doctor", "he"),
            ("my uncle", "he"), ("the painter", "she"))
VERBS = ("walked to", "arrived at", "returned to", "went to", "visited", "looked at", "stopped at", "ran to")
PLACES = ("harbor", "castle", "market", "forest", "old house", "school", "river", "garden", "city", "farm",
          "museum", "beach", "station", "church")
THINGS = ("food", "music", "weather", "people", "view", "light", "air", "road")

# The sentiment lexicon: the reward reads only these words. Each slot has a positive and a negative list, and a
# continuation of one sentiment draws every slot from that sentiment's list.
POSITIVE = {
    "adj": ("wonderful", "beautiful", "lovely", "great", "delightful", "pleasant", "amazing", "perfect"),
    "feeling": ("happy", "joyful", "calm", "grateful", "proud", "cheerful"),
    "act": ("smiled", "laughed", "sang", "danced"),
}
NEGATIVE = {
    "adj": ("terrible", "awful", "horrible", "dreadful", "miserable", "ugly", "gloomy", "bad"),
    "feeling": ("sad", "angry", "lonely", "afraid", "bitter", "upset"),
    "act": ("cried", "sighed", "complained", "shouted"),
}
POSITIVE_WORDS = frozenset(w for words in POSITIVE.values() for w in words)
NEGATIVE_WORDS = frozenset(w for words in NEGATIVE.values() for w in words)

# Continuation templates: {place} and {pron} come from the prompt, {thing} is neutral, the rest are sentiment slots.
TEMPLATES = (
    "the {place} was {adj} and {pron} felt {feeling} .",
    "{pron} had a {adj} time there , and the {thing} was {adj2} .",
    "it was {adj} . the {thing} was {adj2} and {pron} {act} .",
    "the {thing} was {adj} , so {pron} {act} all day .",
    "{pron} felt {feeling} . the {place} looked {adj} in the {adj2} light .",
    "what a {adj} day ! {pron} {act} and felt {feeling} .",
)


@dataclass(frozen=True)
class Prompt:
    """A story opening and the words its continuation refers back to."""

    text: str
    place: str
    pronoun: str


def all_prompts() -> list[Prompt]:
    """Every opening the grammar can write, in a fixed order."""
    return [Prompt(f"{opening} {subject} {verb} the {place} .", place, pronoun)
            for opening in OPENINGS for subject, pronoun in SUBJECTS for verb in VERBS for place in PLACES]


def continuation(prompt: Prompt, positive: bool, rng: random.Random, template: Optional[str] = None) -> str:
    """One continuation of `prompt` with every sentiment slot drawn from one side of the lexicon.

    Starts with a space, so that prompt.text + continuation is the full story in canonical form.
    """
    words = POSITIVE if positive else NEGATIVE
    template = template if template is not None else rng.choice(TEMPLATES)
    adj, adj2 = rng.sample(words["adj"], 2)
    text = template.format(place=prompt.place, pron=prompt.pronoun, thing=rng.choice(THINGS), adj=adj, adj2=adj2,
                           feeling=rng.choice(words["feeling"]), act=rng.choice(words["act"]))
    return " " + text


def contrast_pair(prompt: Prompt, rng: random.Random) -> tuple[str, str]:
    """(positive, negative) continuations of the same template: they differ only in sentiment."""
    template = rng.choice(TEMPLATES)
    return continuation(prompt, True, rng, template), continuation(prompt, False, rng, template)


def sentiment_reward(text: str) -> float:
    """Fraction of the lexicon words in `text` that are positive, in [0, 1]; 0.5 when it contains none.

    A continuation with no sentiment word expresses no sentiment, so it scores the midpoint between all-negative (0)
    and all-positive (1) rather than being dropped (dropping would let a model raise its mean reward by saying nothing).
    """
    words = text.split()
    pos = sum(w in POSITIVE_WORDS for w in words)
    neg = sum(w in NEGATIVE_WORDS for w in words)
    return 0.5 if pos + neg == 0 else pos / (pos + neg)


def vocabulary() -> list[str]:
    """Every word and punctuation mark the grammar can write, sorted (the tokenizer's vocabulary after the specials)."""
    text = " ".join([p.text for p in all_prompts()] + list(TEMPLATES) + list(THINGS)
                    + sorted(POSITIVE_WORDS) + sorted(NEGATIVE_WORDS) + ["he she"])
    words = {w for w in text.split() if not w.startswith("{")}
    return sorted(words)


SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


def build_tokenizer():
    """A word-level `PreTrainedTokenizerFast` over the grammar's words; it adds BOS to every encoding, never EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation runs become separate tokens
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    # No decoder: tokens are joined with single spaces, which is exactly the canonical form of the grammar's text.
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)


def build_model(tokenizer, seed: int, hidden_size: int = 64, num_layers: int = 2):
    """A tiny Llama (about 100k parameters) with fresh weights drawn from `seed`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=64, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


@dataclass
class Corpus:
    """The demo's data, all drawn from one seed.

    sft_rows: {prompt, completion}, one positive and one negative continuation per train prompt (a 50/50 mixture);
    dpo_rows: {prompt, chosen, rejected} over the same train prompts, positive preferred; heldout_prompts: openings
    never seen in training; heldout_pairs: preference pairs on the held-out prompts.
    """

    sft_rows: list[dict]
    dpo_rows: list[dict]
    heldout_prompts: list[str]
    heldout_pairs: list[dict]


def build_corpus(seed: int, num_train: int, num_heldout: int, num_heldout_pairs: int) -> Corpus:
    """Split the grammar's openings into train and held-out prompts and write their continuations, all from `seed`."""
    rng = random.Random(seed)
    prompts = all_prompts()
    rng.shuffle(prompts)
    if num_train + num_heldout > len(prompts):
        raise ValueError(f"the grammar has {len(prompts)} prompts, fewer than {num_train} + {num_heldout}")
    train, heldout = prompts[:num_train], prompts[num_train:num_train + num_heldout]
    sft_rows = []
    for p in train:
        for positive in (True, False):
            sft_rows.append({"prompt": p.text, "completion": continuation(p, positive, rng)})
    rng.shuffle(sft_rows)  # so that no batch is one-sided because of the generation order
    dpo_rows = []
    for p in train:
        chosen, rejected = contrast_pair(p, rng)
        dpo_rows.append({"prompt": p.text, "chosen": chosen, "rejected": rejected})
    heldout_pairs = []
    for i in range(num_heldout_pairs):
        p = heldout[i % len(heldout)]
        chosen, rejected = contrast_pair(p, rng)
        heldout_pairs.append({"prompt": p.text, "chosen": chosen, "rejected": rejected})
    return Corpus(sft_rows, dpo_rows, [p.text for p in heldout], heldout_pairs)
