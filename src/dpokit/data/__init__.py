"""Data layer: read rows (`readers`), validate them into canonical examples (`formats`, `examples`), tokenize them
(`tokenize`; collation is in `collate`).

    rows, name = load_rows("train.jsonl")
    examples, report = preference_examples(rows, name)
    pairs = tokenize_preference(examples, tokenizer, max_length=1024, report=report)
    print(report.summary())
"""

from dpokit.data.examples import DataReport, PreferenceExample, PromptExample, SFTExample
from dpokit.data.formats import (
    PAIR_STRATEGIES,
    PREFERENCE_FORMATS,
    SFT_FORMATS,
    detect_preference_format,
    detect_sft_format,
    parse_hh_transcript,
    preference_examples,
    prompt_examples,
    scored_pairs,
    sft_examples,
    split_hh_transcript,
)
from dpokit.data.readers import load_rows
from dpokit.data.tokenize import TRUNCATION_MODES, TokenizedPair, TokenizedSFT, tokenize_preference, tokenize_sft

__all__ = [
    "PAIR_STRATEGIES",
    "PREFERENCE_FORMATS",
    "SFT_FORMATS",
    "TRUNCATION_MODES",
    "DataReport",
    "PreferenceExample",
    "PromptExample",
    "SFTExample",
    "TokenizedPair",
    "TokenizedSFT",
    "detect_preference_format",
    "detect_sft_format",
    "load_rows",
    "parse_hh_transcript",
    "preference_examples",
    "prompt_examples",
    "scored_pairs",
    "sft_examples",
    "split_hh_transcript",
    "tokenize_preference",
    "tokenize_sft",
]
