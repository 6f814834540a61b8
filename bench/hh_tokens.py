"""How many tokens each layout runs on the HH-RLHF pairs (the Llama-2 tokenizer, dpokit's tokenization).

    PYTHONPATH=src python bench/hh_tokens.py [--max-length 512] [--pairs-per-batch 8]

Layouts: padded (chosen-then-rejected, every row padded to the batch's longest, as TRL and dpokit's padded path do;
batches of consecutive pairs in a seeded random order), packed (no padding, prompt once with each completion) and
packed with a shared prompt (prompt once per pair). This is the work the decoder does per pair; it is what decides
whether the shared prompt pays.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dpokit import bench  # noqa: E402
from dpokit.data.collate import pair_tokens  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--pairs-per-batch", type=int, default=8)
    args = parser.parse_args()
    preset = bench.Preset(**{**bench.dataclasses.asdict(bench.PRESETS["cpu-tiny"]), "max_length": args.max_length})
    from transformers import AutoTokenizer

    from dpokit import data as D

    tok = AutoTokenizer.from_pretrained(str(bench.DEFAULT_TOKENIZER))
    rows, name = D.load_rows(str(bench.DEFAULT_DATA))
    examples, report = D.preference_examples(rows, name)
    pairs = D.tokenize_preference(examples, tok, max_length=preset.max_length, truncation_mode="keep_end", report=report)
    order = np.random.default_rng(0).permutation(len(pairs))
    pairs = [pairs[i] for i in order]
    prompt = np.array([len(p.prompt_ids) for p in pairs])
    completion = np.array([len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs])
    padded = 0
    for i in range(0, len(pairs), args.pairs_per_batch):
        group = pairs[i:i + args.pairs_per_batch]
        width = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in group)
        padded += 2 * len(group) * width
    packed = sum(pair_tokens(p, False) for p in pairs)
    shared = sum(pair_tokens(p, True) for p in pairs)
    print(f"{len(pairs)} HH pairs, max_length {preset.max_length}: prompt tokens p50 {np.median(prompt):.0f} "
          f"(mean {prompt.mean():.0f}), completion tokens p50 {np.median(completion):.0f} (mean {completion.mean():.0f})")
    print(f"{'layout':<44}{'tokens':>12}{'vs padded':>12}")
    for label, n in [(f"padded, {args.pairs_per_batch} pairs per batch", padded), ("packed (prompt twice)", packed),
                     ("packed, shared prompt (prompt once)", shared)]:
        print(f"{label:<44}{n:>12,}{n / padded:>12.2f}")


if __name__ == "__main__":
    main()
