"""The setup every tutorial step shares: command-line options, the tokenizer, and the model.

By default the model is a tiny Llama built from a config in code (two layers, hidden size 64) and the tokenizer is
dpokit's demo tokenizer (a word-level vocabulary over the demo's sentences), so every step runs in seconds on a CPU
with no download. `--model PATH` loads a real Hugging Face model directory (or hub id) and its tokenizer instead;
`--tokenizer PATH` loads another tokenizer (the tiny model then takes that tokenizer's vocabulary size).
"""

from __future__ import annotations

import argparse
import os

# `datasets` may fork after a fast tokenizer has run, and the tokenizers library then warns on every fork; these
# steps tokenize a few rows and gain nothing from its threads.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(description: str, extra=None) -> argparse.Namespace:
    """`--output_dir DIR` (required), `--model PATH`, `--tokenizer PATH`, `--max_steps N`; `extra(parser)` adds a
    step's own options."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--output_dir", required=True, help="where the step writes its runs and files")
    parser.add_argument("--model", default=None,
                        help="a Hugging Face model directory or hub id (default: a tiny Llama built in code)")
    parser.add_argument("--tokenizer", default=None,
                        help="a tokenizer directory or hub id (default: the model's, else dpokit's demo tokenizer)")
    parser.add_argument("--max_steps", type=int, default=8, help="optimizer steps of each training run")
    if extra is not None:
        extra(parser)
    return parser.parse_args()


def load_tokenizer(args):
    from transformers import AutoTokenizer

    if args.tokenizer or args.model:
        return AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    from dpokit.demo import build_tokenizer

    return build_tokenizer()


def load_model(args, tokenizer, seed: int = 0):
    """The policy to train: `--model`, else a tiny Llama with fresh weights drawn from `seed`."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                         else tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def base_model_path(args, tokenizer) -> str:
    """A directory (or hub id) holding the starting model and its tokenizer: `--model`, else the tiny model saved
    into `output_dir/base`. Steps that record where a run started (a LoRA adapter names its base model; evaluation
    compares a run with its reference) load the model from a path, as a user's script does."""
    if args.model:
        return args.model
    path = os.path.join(args.output_dir, "base")
    load_model(args, tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def preference_rows(num_train: int = 64, num_eval: int = 16, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Train and held-out prompt/chosen/rejected rows from dpokit's demo corpus: story openings, each with a
    positive (chosen) and a negative (rejected) continuation; the held-out rows have prompts never trained on."""
    from dpokit.demo import build_corpus

    corpus = build_corpus(seed, num_train=num_train, num_heldout=num_eval, num_heldout_pairs=num_eval)
    return corpus.dpo_rows, corpus.heldout_pairs


def common_args(args) -> dict:
    """DPOConfig keys every step sets the same way: a short run, quiet, nothing sent to a tracker."""
    return dict(max_steps=args.max_steps, per_device_train_batch_size=8, per_device_eval_batch_size=8,
                learning_rate=5e-4 if not args.model else 5e-6, logging_steps=max(1, args.max_steps // 2),
                max_length=128, save_steps=0, report_to="none", disable_tqdm=True, overwrite_output_dir=True, seed=0)


def show(title: str, metrics: dict) -> None:
    """Print a metrics dict one key a line, as a user reads a run's result."""
    print(f"== {title}")
    for key, value in metrics.items():
        print(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")
