"""`dpokit demo`: a miniature of the DPO paper's controlled-sentiment experiment (Rafailov et al. 2023, section 6.1).

The paper fine-tunes GPT-2 on IMDb reviews, then uses DPO to make it continue review prefixes positively, and plots
reward (a sentiment classifier's score) against KL to the SFT model. This demo runs the same pipeline at toy scale,
with no downloads, in well under a minute on 2 CPU cores:

1. **Corpus.** A seeded template grammar writes one-sentence story openings ("one morning , the old fisherman walked
   to the harbor .") and one-sentence continuations that are either positive ("the harbor was wonderful and he felt
   happy .") or negative (the same template with "terrible" and "sad"). Prompts are split into train and held-out.
2. **Tokenizer and model.** A word-level tokenizer over the grammar's words (the `tokenizers` library, wrapped as a
   `PreTrainedTokenizerFast` with BOS/EOS/pad/unk) and a tiny `LlamaForCausalLM` built from a config (one layer,
   hidden size 64, 82k parameters).
3. **SFT** on every train prompt with one positive and one negative continuation: the SFT model writes positive and
   negative continuations about equally often, so its mean reward is about 0.5.
4. **DPO** on pairs (prompt, positive continuation, negative continuation) over the train prompts, the SFT model as
   reference.
5. **Evaluation** on held-out prompts, before (SFT) and after (DPO), with the same seed and the same prompts, sampling
   at temperature 1 (never greedy, which would hide the spread of the distribution):
   * reward: the sentiment-lexicon score of each sampled continuation (`sentiment_reward`), averaged;
   * KL(pi || pi_SFT), estimated from the policy's own samples as the mean of log pi(y) - log pi_SFT(y);
   * preference accuracy on held-out pairs: the fraction with a positive implicit-reward margin
     beta * [(log pi - log pi_SFT)(chosen) - (log pi - log pi_SFT)(rejected)], a tie counting as wrong (as training's
     rewards/accuracies and TRL count it). The SFT model is its own reference, so every margin is exactly 0: it
     scores 0 by construction.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from dpokit.fileio import atomic_path, atomic_write_text

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


def _draw_slots(rng: random.Random) -> dict:
    """The random choices of one continuation except its sentiment: template, neutral noun, word positions."""
    return {"template": rng.choice(TEMPLATES), "thing": rng.choice(THINGS),
            "adj": rng.sample(range(len(POSITIVE["adj"])), 2), "feeling": rng.randrange(len(POSITIVE["feeling"])),
            "act": rng.randrange(len(POSITIVE["act"]))}


def _fill(prompt: Prompt, slots: dict, positive: bool) -> str:
    words = POSITIVE if positive else NEGATIVE
    adj, adj2 = (words["adj"][i] for i in slots["adj"])
    text = slots["template"].format(place=prompt.place, pron=prompt.pronoun, thing=slots["thing"], adj=adj,
                                    adj2=adj2, feeling=words["feeling"][slots["feeling"]],
                                    act=words["act"][slots["act"]])
    return " " + text  # the space joins it to the prompt: prompt.text + continuation is the story in canonical form


def continuation(prompt: Prompt, positive: bool, rng: random.Random) -> str:
    """One continuation of `prompt` (starting with a space) with every sentiment slot from one side of the lexicon."""
    return _fill(prompt, _draw_slots(rng), positive)


def contrast_pair(prompt: Prompt, rng: random.Random) -> tuple[str, str]:
    """(positive, negative) continuations that differ only in their sentiment words ("wonderful" / "terrible").

    Both come from the same draw, so a preference between them can only be about sentiment.
    """
    slots = _draw_slots(rng)
    return _fill(prompt, slots, True), _fill(prompt, slots, False)


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


def build_model(tokenizer, seed: int, hidden_size: int = 64, num_layers: int = 1):
    """A tiny Llama (82k parameters at the defaults) with fresh weights drawn from `seed`.

    One layer is enough for this grammar (keeping a continuation's sentiment consistent means attending back to the
    earlier sentiment words) and, in our runs, learns that consistency in fewer steps than two layers.
    """
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


# --------------------------------------------------------------------------------------------------------------------
# The experiment


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and hyper-parameters of one demo run (`FULL` for `dpokit demo`, `QUICK` for tests)."""

    num_train_prompts: int
    num_heldout_prompts: int
    num_heldout_pairs: int
    num_samples: int  # sampled continuations per held-out prompt
    hidden_size: int
    num_layers: int
    sft_epochs: float
    sft_learning_rate: float
    sft_batch_size: int
    dpo_epochs: float
    dpo_learning_rate: float
    dpo_batch_size: int
    # Within the paper's IMDb sweep (0.05 to 5), firmer than TRL's default 0.1: at 0.1 the same runs reach about the
    # same reward with up to twice the KL to the SFT model (seeds 0-2: 0.6-3.9 nats against 0.5-1.8).
    beta: float = 1.0
    temperature: float = 1.0
    max_new_tokens: int = 32  # the grammar's longest continuation is 14 tokens + EOS; cut samples are counted


FULL = DemoSettings(num_train_prompts=1000, num_heldout_prompts=128, num_heldout_pairs=256, num_samples=8,
                    hidden_size=64, num_layers=1,
                    sft_epochs=8, sft_learning_rate=5e-3, sft_batch_size=32,
                    dpo_epochs=2, dpo_learning_rate=7e-5, dpo_batch_size=16)
QUICK = DemoSettings(num_train_prompts=600, num_heldout_prompts=64, num_heldout_pairs=64, num_samples=4,
                     hidden_size=64, num_layers=1,
                     sft_epochs=10, sft_learning_rate=5e-3, sft_batch_size=32,
                     dpo_epochs=2, dpo_learning_rate=1e-4, dpo_batch_size=16)


def evaluate_policy(policy, reference, tokenizer, corpus: Corpus, settings: DemoSettings, seed: int) -> dict:
    """Reward of sampled continuations, KL(policy || reference) from those samples, held-out preference accuracy.

    The samples are drawn with `seed`, so two policies evaluated with the same seed see the same prompts and the
    same random stream.
    """
    from dpokit import evaluate as E

    prompts = corpus.heldout_prompts
    samples = E.sample_completions(policy, tokenizer, prompts, num_samples=settings.num_samples,
                                   temperature=settings.temperature, max_new_tokens=settings.max_new_tokens,
                                   seed=seed, batch_size=128)
    flat_prompts = [p for p, group in zip(prompts, samples) for _ in group]
    flat = [s for group in samples for s in group]
    rewards = [sentiment_reward(s) for s in flat]
    reward, reward_se = E.mean_and_se(rewards)
    # A sample cut by max_new_tokens is scored as if it had ended there (see sample_completions); count them.
    num_cut = sum(len(c) - 1 >= settings.max_new_tokens for _, c in E.completion_ids(tokenizer, flat_prompts, flat))
    kl, kl_se = E.kl_from_samples(E.sequence_logps(policy, tokenizer, flat_prompts, flat, batch_size=128),
                                  E.sequence_logps(reference, tokenizer, flat_prompts, flat, batch_size=128))
    pair_prompts = [r["prompt"] for r in corpus.heldout_pairs]
    scores = {}
    for name, model in (("policy", policy), ("ref", reference)):
        for side in ("chosen", "rejected"):
            scores[f"{name}_{side}"] = E.sequence_logps(model, tokenizer, pair_prompts,
                                                        [r[side] for r in corpus.heldout_pairs], batch_size=128)
    pairs = E.pair_metrics(scores["policy_chosen"], scores["policy_rejected"], scores["ref_chosen"],
                           scores["ref_rejected"], settings.beta)
    return {
        "reward": reward, "reward_se": reward_se,
        "kl": kl, "kl_se": kl_se,
        "preference_accuracy": pairs["accuracy"], "preference_accuracy_se": pairs["accuracy_se"],
        "reward_margin": pairs["margin"],
        "num_samples": len(flat),
        "num_cut": num_cut,
        "samples": [{"prompt": p, "completion": s, "reward": r} for p, s, r in zip(flat_prompts, flat, rewards)],
    }


def run_demo(output_dir: Optional[str] = None, seed: int = 0, quick: bool = False) -> dict:
    """Run the whole experiment; returns {"before", "after", "settings", "seed", "quick", "runtime_s", "timings"}.

    "before" measures the SFT model, "after" the DPO policy; each holds reward (+ _se), kl (+ _se),
    preference_accuracy (+ _se), reward_margin, num_samples, num_cut (samples cut at max_new_tokens) and the samples
    ({prompt, completion, reward}). `timings` splits `runtime_s` into setup+SFT, the two evaluations and DPO. With `output_dir`, the SFT and DPO models (with the
    tokenizer), the trainers' logs, results.json and samples.jsonl are written there; otherwise nothing is kept.
    """
    import torch

    start = time.perf_counter()
    settings = QUICK if quick else FULL
    # One thread: at this size every op is a few microseconds of work, and a second thread only adds synchronisation,
    # which costs 30x when another process holds the other core (measured on 2 busy cores: 1.5 s vs 50 s for 32 SFT
    # steps).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(output_dir, seed, quick, settings, start)
    finally:
        torch.set_num_threads(threads)


def _trainer_args(seed: int) -> dict:
    """Config keys shared by every trainer of the demo and the frontier."""
    return dict(max_length=64, seed=seed, logging_steps=50, save_steps=0, disable_tqdm=True, report_to="none",
                overwrite_output_dir=True)


def _sft_trainer(model, rows: list[dict], tokenizer, output_dir: Path, learning_rate: float, epochs: float,
                 batch_size: int, seed: int):
    from dpokit import SFTConfig, SFTTrainer

    return _quiet(SFTTrainer(model, args=SFTConfig(output_dir=str(output_dir), learning_rate=learning_rate,
                                                   num_train_epochs=epochs, per_device_train_batch_size=batch_size,
                                                   **_trainer_args(seed)),
                             train_dataset=rows, processing_class=tokenizer))


def _dpo_trainer(model, rows: list[dict], tokenizer, output_dir: Path, beta: float, learning_rate: float,
                 epochs: float, batch_size: int, seed: int):
    """A sigmoid-loss DPO trainer of `model`; with ref_model=None the reference is a frozen copy of `model` as given."""
    from dpokit import DPOConfig, DPOTrainer

    return _quiet(DPOTrainer(model, ref_model=None,
                             args=DPOConfig(output_dir=str(output_dir), beta=beta, loss_type="sigmoid",
                                            learning_rate=learning_rate, num_train_epochs=epochs,
                                            per_device_train_batch_size=batch_size, **_trainer_args(seed)),
                             train_dataset=rows, processing_class=tokenizer))


def _quiet(trainer):
    """The demo prints one table: its trainers keep their logs in metrics.jsonl, not on the console (the
    transformers way to silence a trainer's printed metrics is to remove its PrinterCallback)."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def _run(output_dir: Optional[str], seed: int, quick: bool, settings: DemoSettings, start: float) -> dict:
    import copy

    tokenizer = build_tokenizer()
    corpus = build_corpus(seed, settings.num_train_prompts, settings.num_heldout_prompts, settings.num_heldout_pairs)
    model = build_model(tokenizer, seed, hidden_size=settings.hidden_size, num_layers=settings.num_layers)
    with tempfile.TemporaryDirectory(prefix="dpokit-demo-") as scratch:
        root = Path(output_dir) if output_dir is not None else Path(scratch)
        sft = _sft_trainer(model, corpus.sft_rows, tokenizer, root / "sft", settings.sft_learning_rate,
                           settings.sft_epochs, settings.sft_batch_size, seed)
        sft.train()
        timings = {"sft_s": time.perf_counter() - start}
        sft_model = sft.model.eval()
        if output_dir is not None:
            sft.save_model(str(root / "sft"))
        before = evaluate_policy(sft_model, sft_model, tokenizer, corpus, settings, seed)
        timings["eval_before_s"] = time.perf_counter() - start - sum(timings.values())

        # DPO trains a copy, so the SFT model stays as it is: the reference of the KL and of the implicit rewards.
        dpo = _dpo_trainer(copy.deepcopy(sft_model), corpus.dpo_rows, tokenizer, root / "dpo", settings.beta,
                           settings.dpo_learning_rate, settings.dpo_epochs, settings.dpo_batch_size, seed)
        dpo.train()
        timings["dpo_s"] = time.perf_counter() - start - sum(timings.values())
        policy = dpo.model.eval()
        if output_dir is not None:
            dpo.save_model(str(root / "dpo"))
        after = evaluate_policy(policy, sft_model, tokenizer, corpus, settings, seed)
        timings["eval_after_s"] = time.perf_counter() - start - sum(timings.values())
        result = {"seed": seed, "quick": quick, "settings": dataclasses.asdict(settings),
                  "before": before, "after": after, "runtime_s": time.perf_counter() - start, "timings": timings}
        if output_dir is not None:
            _write_results(root, result)
    return result


def _write_results(root: Path, result: dict) -> None:
    """results.json (the numbers) and samples.jsonl (every sample, before and after, with its reward)."""
    summary = {k: v for k, v in result.items() if k not in ("before", "after")}
    for phase in ("before", "after"):
        summary[phase] = {k: v for k, v in result[phase].items() if k != "samples"}
    atomic_write_text(root / "results.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(root / "samples.jsonl", "".join(
        json.dumps({"model": "sft" if phase == "before" else "dpo", **sample}) + "\n"
        for phase in ("before", "after") for sample in result[phase]["samples"]))


# --------------------------------------------------------------------------------------------------------------------
# The frontier: reward against KL to the SFT model for SFT, Preferred-FT and DPO at several betas (the paper's figure 2)

FRONTIER_BETAS = (0.05, 0.1, 0.3, 1.0, 3.0)  # the paper's IMDb sweep spans 0.05 to 5
# Several training lengths per method, as the paper's frontier has several points per method (it also varies
# hyper-parameters and evaluates checkpoints along training). Lengths are in epochs over the train prompts; each length
# is its own run with its own linear learning-rate decay, not a checkpoint of a longer run.
FRONTIER_DPO_EPOCHS = (1.0, 2.0, 3.0)
FRONTIER_PREFERRED_EPOCHS = (0.25, 0.5, 1.0, 2.0)
# Preferred-FT continues SFT on the chosen continuations only. At the SFT learning rate it would start from a
# fresh linear schedule at 5e-3 and move far in a few steps; the frontier needs points across a range of KL.
PREFERRED_LEARNING_RATE = 5e-4


def run_frontier(output_dir: Optional[str] = None, seed: int = 0, quick: bool = False,
                 betas: Sequence[float] = FRONTIER_BETAS, dpo_epochs: Sequence[float] = FRONTIER_DPO_EPOCHS,
                 preferred_epochs: Sequence[float] = FRONTIER_PREFERRED_EPOCHS,
                 preferred_learning_rate: float = PREFERRED_LEARNING_RATE) -> dict:
    """Train the demo's SFT model, then Preferred-FT and DPO variants from it, and measure each like the demo does.

    Returns {"seed", "quick", "settings", "frontier": {...}, "points", "runtime_s"}; each point holds method ("SFT",
    "Preferred-FT" or "DPO"), beta (DPO only), epochs (None for SFT), train_s, and `evaluate_policy`'s numbers
    without the samples. Every policy is evaluated on the same held-out prompts with the same seed, and its KL is
    to the SFT model. With `output_dir`, frontier.json and frontier.png are written there.
    """
    import torch

    start = time.perf_counter()
    settings = QUICK if quick else FULL
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see run_demo
    try:
        result = _frontier(seed, quick, settings, tuple(betas), tuple(dpo_epochs), tuple(preferred_epochs),
                           preferred_learning_rate, start)
    finally:
        torch.set_num_threads(threads)
    if output_dir is not None:
        root = Path(output_dir)
        atomic_write_text(root / "frontier.json", json.dumps(result, indent=2) + "\n")
        plot_frontier(result, root / "frontier.png")
    return result


def _frontier(seed: int, quick: bool, settings: DemoSettings, betas: tuple, dpo_epochs: tuple,
              preferred_epochs: tuple, preferred_learning_rate: float, start: float) -> dict:
    import copy

    tokenizer = build_tokenizer()
    corpus = build_corpus(seed, settings.num_train_prompts, settings.num_heldout_prompts, settings.num_heldout_pairs)
    model = build_model(tokenizer, seed, hidden_size=settings.hidden_size, num_layers=settings.num_layers)
    points = []

    def measure(method: str, policy, reference, beta, epochs, train_s: float) -> None:
        # The implicit-reward accuracy needs a beta; Preferred-FT and SFT have none, and the demo's is used (the
        # accuracy's sign test does not depend on it, only the margin's scale does).
        eval_settings = settings if beta is None else dataclasses.replace(settings, beta=beta)
        metrics = evaluate_policy(policy, reference, tokenizer, corpus, eval_settings, seed)
        metrics.pop("samples")
        points.append({"method": method, "beta": beta, "epochs": epochs, "train_s": train_s, **metrics})
        label = method + (f" beta {beta:g}" if beta is not None else "") + (f", {epochs:g} ep" if epochs else "")
        print(f"[dpokit] frontier: {label}: reward {metrics['reward']:.3f}, KL {metrics['kl']:.3f}", file=sys.stderr)

    # Trainer outputs (logs, configs) go to a scratch folder: the frontier keeps only its numbers and its plot.
    with tempfile.TemporaryDirectory(prefix="dpokit-frontier-") as scratch:
        root = Path(scratch)
        t0 = time.perf_counter()
        sft = _sft_trainer(model, corpus.sft_rows, tokenizer, root / "sft", settings.sft_learning_rate,
                           settings.sft_epochs, settings.sft_batch_size, seed)
        sft.train()
        sft_model = sft.model.eval()
        measure("SFT", sft_model, sft_model, None, None, time.perf_counter() - t0)

        # Preferred-FT: SFT continued on the preferred continuation of each DPO pair, the rejected one never seen.
        chosen_rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in corpus.dpo_rows]
        for epochs in preferred_epochs:
            t0 = time.perf_counter()
            trainer = _sft_trainer(copy.deepcopy(sft_model), chosen_rows, tokenizer, root / f"pft-{epochs:g}",
                                   preferred_learning_rate, epochs, settings.sft_batch_size, seed)
            trainer.train()
            measure("Preferred-FT", trainer.model.eval(), sft_model, None, epochs, time.perf_counter() - t0)

        for beta in betas:
            for epochs in dpo_epochs:
                t0 = time.perf_counter()
                trainer = _dpo_trainer(copy.deepcopy(sft_model), corpus.dpo_rows, tokenizer,
                                       root / f"dpo-{beta:g}-{epochs:g}", beta, settings.dpo_learning_rate, epochs,
                                       settings.dpo_batch_size, seed)
                trainer.train()
                measure("DPO", trainer.model.eval(), sft_model, beta, epochs, time.perf_counter() - t0)
    frontier = {"betas": list(betas), "dpo_epochs": list(dpo_epochs), "dpo_learning_rate": settings.dpo_learning_rate,
                "preferred_epochs": list(preferred_epochs), "preferred_learning_rate": preferred_learning_rate}
    return {"seed": seed, "quick": quick, "settings": dataclasses.asdict(settings), "frontier": frontier,
            "points": points, "runtime_s": time.perf_counter() - start}


FRONTIER_MARKERS = {"SFT": "*", "Preferred-FT": "s", "DPO": "o"}


def plot_frontier(result: dict, path: Path) -> None:
    """Reward (y) against KL to the SFT model (x) with standard errors: one marker style per method, one colour per
    DPO beta, and a line through each series' training lengths (shortest first)."""
    # A Figure with the Agg canvas, not pyplot: no global backend switch and no figure registry inside a library.
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    points = result["points"]
    betas = sorted({p["beta"] for p in points if p["method"] == "DPO"})
    cmap = colormaps["viridis"]
    series = [("SFT", None, "black", "SFT"), ("Preferred-FT", None, "tab:red", "Preferred-FT")]
    # Labelled points would overlap where the series meet; a colour per beta keeps them apart.
    series += [("DPO", b, cmap(0.9 * i / max(1, len(betas) - 1)), f"DPO β={b:g}") for i, b in enumerate(betas)]
    for method, beta, color, label in series:
        pts = sorted((p for p in points if p["method"] == method and p["beta"] == beta),
                     key=lambda p: p["epochs"] or 0)
        if not pts:
            continue
        ax.errorbar([p["kl"] for p in pts], [p["reward"] for p in pts], xerr=[p["kl_se"] for p in pts],
                    yerr=[p["reward_se"] for p in pts], marker=FRONTIER_MARKERS[method], color=color,
                    markersize=13 if method == "SFT" else 6, capsize=2, linewidth=1, label=label)
    s, f = result["settings"], result["frontier"]
    ax.set_xlabel("KL(policy || SFT), nats per sample")
    ax.set_ylabel("mean reward of samples (lexicon)")
    ax.set_title(f"dpokit demo --frontier, seed {result['seed']}: {s['num_heldout_prompts']} held-out prompts x "
                 f"{s['num_samples']} samples\nlines join training lengths: Preferred-FT "
                 f"{', '.join(f'{e:g}' for e in f['preferred_epochs'])} epochs, DPO "
                 f"{', '.join(f'{e:g}' for e in f['dpo_epochs'])} epochs", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")


def format_frontier_table(result: dict) -> str:
    """One row per trained policy: method, beta, training length, reward and KL to the SFT model, with errors."""
    s, f = result["settings"], result["frontier"]
    lines = [
        f"dpokit demo --frontier: reward vs KL to the SFT model (DPO paper, figure 2), seed {result['seed']}"
        f"{', quick' if result['quick'] else ''}",
        f"{s['num_heldout_prompts']} held-out prompts x {s['num_samples']} samples at temperature "
        f"{s['temperature']:g}, same prompts and seed for every policy",
        f"Preferred-FT: SFT continued on the chosen continuations, lr {f['preferred_learning_rate']:g}; "
        f"DPO: sigmoid loss from the SFT model, lr {f['dpo_learning_rate']:g}; every row is its own run from the SFT model",
        "",
        f"{'method':<14}{'beta':>6}{'epochs':>8}{'reward':>18}{'KL(pi || SFT)':>18}{'pref. acc.':>12}",
    ]
    for p in result["points"]:
        beta = f"{p['beta']:g}" if p["beta"] is not None else "-"
        epochs = f"{p['epochs']:g}" if p["epochs"] is not None else "-"
        reward = f"{p['reward']:.3f} ± {p['reward_se']:.3f}"
        kl = f"{p['kl']:.3f} ± {p['kl_se']:.3f}"
        lines.append(f"{p['method']:<14}{beta:>6}{epochs:>8}{reward:>18}{kl:>18}{p['preference_accuracy']:>12.3f}")
    cut = sum(p["num_cut"] for p in result["points"])
    lines += ["",
              "reward: fraction of the sentiment words in a sampled continuation that are positive (0.5 if none);",
              "KL: mean of log pi(y) - log pi_SFT(y) over the policy's own samples (0 for the SFT model itself);",
              "pref. acc.: held-out pairs whose implicit reward prefers the positive continuation (a tie is wrong).",
              f"samples cut at {s['max_new_tokens']} tokens, all policies: {cut}; runtime "
              f"{result['runtime_s']:.0f} s"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Command line


def format_table(result: dict) -> str:
    """The before/after table, with standard errors, and one sampled continuation per model for the first prompts."""
    s = result["settings"]
    before, after = result["before"], result["after"]
    rows = [
        ("mean reward of samples (lexicon)", "reward"),
        ("KL(policy || SFT), nats/sample", "kl"),
        ("preference accuracy, held-out pairs", "preference_accuracy"),
    ]
    lines = [
        f"dpokit demo: controlled sentiment (DPO paper, section 6.1), seed {result['seed']}"
        f"{', quick' if result['quick'] else ''}",
        f"{s['num_heldout_prompts']} held-out prompts x {s['num_samples']} samples at temperature {s['temperature']:g}, "
        f"same prompts and seed before and after; DPO beta {s['beta']:g}",
        "",
        f"{'':38}{'SFT (before)':>16}{'DPO (after)':>16}",
    ]
    for label, key in rows:
        cells = [f"{m[key]:.3f} ± {m[key + '_se']:.3f}" for m in (before, after)]
        lines.append(f"{label:38}{cells[0]:>16}{cells[1]:>16}")
    lines += [
        "",
        "reward: fraction of the sentiment words in a continuation that are positive (0.5 if it has none);",
        "KL: mean of log pi(y) - log pi_SFT(y) over the policy's own samples y (0 for the SFT model itself);",
        "accuracy: pairs whose implicit reward beta*log(pi/pi_SFT) prefers the positive continuation, a tie",
        "counting as wrong (the SFT model is its own reference: every margin is 0, so it scores 0 by construction).",
        "",
        "samples (same prompt, same seed):",
    ]
    n = result["settings"]["num_samples"]
    for i in range(3):
        sample_before, sample_after = before["samples"][i * n], after["samples"][i * n]
        lines += [f"  prompt: {sample_before['prompt']}",
                  f"    SFT: {sample_before['completion'].strip()}",
                  f"    DPO: {sample_after['completion'].strip()}"]
    lines += ["", f"samples cut at {s['max_new_tokens']} tokens (scored as if finished): {before['num_cut']} before, "
                  f"{after['num_cut']} after; runtime {result['runtime_s']:.0f} s"]
    return "\n".join(lines)


FRONTIER_OUTPUT_DIR = "runs/demo-frontier"
# What the demo writes into --output_dir, and the file that shows a directory holds an earlier demo's output.
DEMO_FILES = {"results.json", "samples.jsonl", "sft", "dpo"}
FRONTIER_FILES = {"frontier.json", "frontier.png"}


def check_output_dir(output_dir: Optional[str], frontier: bool) -> None:
    """An --output_dir may be new, empty, or an earlier demo's (rewritten); one that holds anything else (another
    run, a user's results.json) is refused before anything is trained, as a training output_dir is."""
    from dpokit.errors import ConfigError

    if output_dir is None or not Path(output_dir).is_dir():
        return
    own, record = (FRONTIER_FILES, "frontier.json") if frontier else (DEMO_FILES, "results.json")
    try:
        earlier = json.loads((Path(output_dir) / record).read_text()).get("seed") is not None
    except (OSError, ValueError, AttributeError, RecursionError):
        earlier = False
    present = sorted(p.name for p in Path(output_dir).iterdir())
    foreign = [name for name in present if name not in own or not earlier]
    if foreign:
        raise ConfigError(f"--output_dir {output_dir} holds files the demo did not write ({', '.join(foreign[:4])}"
                          f"{', ...' if len(foreign) > 4 else ''}); choose a new or empty directory")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`dpokit demo [--output_dir DIR] [--seed N] [--quick] [--frontier]`: run the experiment and print the table."""
    from dpokit.options import Parser, seed

    parser = Parser(prog="dpokit demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default=None, writes=True,
                        help="keep the SFT and DPO models, training logs, results.json and samples.jsonl here "
                             f"(with --frontier: frontier.json and frontier.png, default {FRONTIER_OUTPUT_DIR})")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the corpus, the weights, training and sampling")
    parser.add_argument("--quick", action="store_true", help="a smaller run (about half a minute) for tests")
    parser.add_argument("--frontier", action="store_true",
                        help="reward vs KL to the SFT model for SFT, Preferred-FT and DPO at several betas "
                             "(a few minutes); writes frontier.json and frontier.png")
    args = parser.parse_args(argv)
    if args.frontier:
        output_dir = args.output_dir if args.output_dir is not None else FRONTIER_OUTPUT_DIR
        check_output_dir(output_dir, frontier=True)
        frontier = run_frontier(output_dir=output_dir, seed=args.seed, quick=args.quick)
        print(format_frontier_table(frontier))
        print(f"frontier.json and frontier.png written to {output_dir}")
        return 0
    check_output_dir(args.output_dir, frontier=False)
    result = run_demo(output_dir=args.output_dir, seed=args.seed, quick=args.quick)
    print(format_table(result))
    if args.output_dir is not None:
        print(f"models, logs and samples written to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
