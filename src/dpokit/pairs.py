"""On-policy pair creation: sample completions of prompts from a model, score them with a judge, pair them.

    dpokit pairs --model runs/sft --prompts prompts.jsonl --judge mymodule:score --output pairs.jsonl

This is the data step of iterative ("online") DPO: preference pairs drawn from the policy's own distribution, ranked
by a reward model, a Python scorer or the implicit reward, and written as canonical rows that `dpokit dpo` reads.

For each distinct prompt (`dpokit.data.prompt_examples`: a prompts file, or any preference / SFT file), the model
draws `num_samples` completions (`dpokit.evaluate.draw_samples`: seeded, temperature / top-p only). Before scoring:

* a sample cut at `max_new_tokens` (no EOS) is dropped, unless `keep_unfinished`: training would append an EOS the
  model never wrote, teaching it to stop mid-sentence;
* an empty sample (EOS at once) is dropped: the data layer refuses empty completions;
* a sample equal to an earlier one of the same prompt is scored once (else its pairs would be written twice).

Prompts whose prompt and `max_new_tokens` exceed the model's positions are refused before sampling; `--beta` is read
by the implicit judge only; outputs may not be the prompts file.

The judge scores what is left, and `dpokit.data.scored_pairs` forms the pairs by `pair_strategy` and
`min_score_gap`, exactly as for scored rows read from a file (ties never become pairs). Every drop is counted in
the summary. `scored_output` also writes the scored samples of every prompt left with at least two, as scored rows
(``{"prompt", "completions": [{"text", "score"}]}``), to re-pair later with another strategy without sampling again.

Outputs are written only once everything has been sampled and scored, each atomically; a run that yields no pair
writes nothing and is an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from dpokit.errors import ConfigError, DataError

OUTPUT_SUFFIXES = (".jsonl", ".jsonl.gz")


@dataclass
class PairSettings:
    """How samples are drawn and paired (the `dpokit pairs` options)."""

    num_samples: int = 4
    """Completions sampled per prompt (at least 2: a pair needs two)."""
    temperature: float = 1.0
    """Sampling temperature (> 0)."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; 1 samples from the whole distribution."""
    max_new_tokens: int = 256
    """Longest completion; a sample that reaches it without EOS is unfinished (dropped unless `keep_unfinished`)."""
    seed: int = 0
    """Sampling seed: the same seed, prompts and batch size give the same samples."""
    batch_size: int = 16
    """Sequences per generation / scoring batch."""
    pair_strategy: str = "best_vs_worst"
    """`best_vs_worst` (one pair per prompt), `best_vs_rest` or `all_pairs`, as for scored data."""
    min_score_gap: float = 0.0
    """Smallest score difference that makes a pair (ties never do)."""
    keep_unfinished: bool = False
    """Score and pair samples cut at `max_new_tokens` too (they are trained on as if they had ended there)."""

    def check(self) -> None:
        from dpokit.data import PAIR_STRATEGIES

        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 2:
            raise ConfigError(f"num_samples must be an integer >= 2 (a pair needs two samples), got {self.num_samples!r}")
        for name in ("max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ConfigError(f"temperature must be > 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.pair_strategy not in PAIR_STRATEGIES:
            raise ConfigError(f"pair_strategy {self.pair_strategy!r} is not one of: {', '.join(PAIR_STRATEGIES)}")
        if not (isinstance(self.min_score_gap, (int, float)) and math.isfinite(self.min_score_gap)
                and self.min_score_gap >= 0):
            raise ConfigError(f"min_score_gap must be a number >= 0, got {self.min_score_gap!r}")


def _check_output(path: Optional[str], option: str) -> None:
    if path is not None and not str(path).endswith(OUTPUT_SUFFIXES):
        raise ConfigError(f"{option} {path}: must be a .jsonl or .jsonl.gz file")


def pairs_from_samples(prompts, samples, score, settings: PairSettings, tokenizer=None):
    """Pair the samples of each prompt; returns ``(pair rows, scored rows, counts)``.

    `prompts` are `PromptExample`s, `samples[i]` the `Sample`s of prompts[i], `score(prompts, completions)` a judge
    (`dpokit.evaluate.load_judge`) called once on every kept sample, with each prompt as the model with `tokenizer`
    was given it (`PromptExample.for_model`).
    """
    from dpokit.data import PreferenceExample, scored_pairs
    from dpokit.data.tools import canonical_row

    counts = {"prompts": len(prompts), "samples": sum(len(g) for g in samples), "unfinished": 0, "empty": 0,
              "repeated": 0, "scored": 0, "pairs": 0, "prompts_without_pair": 0}
    kept = []
    for group in samples:
        texts = []
        for s in group:
            if not s.finished:
                counts["unfinished"] += 1
                if not settings.keep_unfinished:
                    continue
            if s.text == "":
                counts["empty"] += 1
                continue
            if s.text in texts:
                counts["repeated"] += 1
                continue
            texts.append(s.text)
        kept.append(texts)
    flat_prompts = [p.for_model(tokenizer) for p, texts in zip(prompts, kept) for _ in texts]
    flat_scores = score(flat_prompts, [t for texts in kept for t in texts]) if flat_prompts else []
    counts["scored"] = len(flat_scores)
    pair_rows, scored_rows, at = [], [], 0
    for p, texts in zip(prompts, kept):
        scores = flat_scores[at:at + len(texts)]
        at += len(texts)
        conversational = isinstance(p.prompt, list)

        def completion(text):
            return [{"role": "assistant", "content": text}] if conversational else text

        found = 0
        if len(texts) >= 2:
            for c, r in scored_pairs(scores, settings.pair_strategy, settings.min_score_gap):
                row = canonical_row(PreferenceExample(p.prompt, completion(texts[c]), completion(texts[r]), p.row,
                                                      p.system))
                pair_rows.append({**row, "score_chosen": scores[c], "score_rejected": scores[r]})
                found += 1
            scored = {"prompt": p.prompt, "completions": [{"text": t, "score": v} for t, v in zip(texts, scores)]}
            scored_rows.append({**scored, "system": p.system} if p.system is not None else scored)
        counts["pairs"] += found
        counts["prompts_without_pair"] += found == 0
    return pair_rows, scored_rows, counts


def create_pairs(model: str, prompts: str, judge: str, output: str, *, ref: Optional[str] = None,
                 settings: Optional[PairSettings] = None, scored_output: Optional[str] = None,
                 beta: Optional[float] = None, column_map: Optional[dict] = None,
                 chat_template: Optional[str] = None) -> dict:
    """Sample, score and pair (module docstring); writes `output` (and `scored_output`); returns the counts."""
    from pathlib import Path

    from dpokit.fileio import refuse_overlap

    from dpokit import data as D
    from dpokit.data.tools import write_jsonl
    from dpokit.evaluate import default_reference, draw_samples, load_judge, run_settings
    from dpokit.models import load_merged, read_chat_template

    settings = settings or PairSettings()
    settings.check()
    _check_output(output, "--output")
    _check_output(scored_output, "--scored_output")
    if scored_output is not None and Path(scored_output).resolve() == Path(output).resolve():
        raise ConfigError("--scored_output must differ from --output")
    refuse_overlap({"--output": output, "--scored_output": scored_output},
                   {"the prompts file": prompts if isinstance(prompts, (str, Path)) else None, "--model": model,
                    "--ref": ref})
    is_implicit = judge.strip() == "implicit"
    if beta is not None and not is_implicit:
        raise ConfigError(f"--beta is the implicit judge's; judge {judge!r} does not read it")
    if beta is not None and not (math.isfinite(beta) and beta > 0):
        raise ConfigError(f"--beta must be a number > 0, got {beta}")
    rows, name = D.load_rows(prompts)
    examples, report = D.prompt_examples(rows, name, column_map=column_map)
    policy, tokenizer = load_merged(model)
    if chat_template is not None:
        tokenizer.chat_template = read_chat_template(chat_template)
    reference = None
    if is_implicit:
        reference, _ = load_merged(ref or default_reference(model))
    beta = float(beta if beta is not None else run_settings(model).get("beta", 0.1))
    score = load_judge(judge, policy=policy, reference=reference, tokenizer=tokenizer, beta=beta,
                       batch_size=settings.batch_size)
    samples = draw_samples(policy, tokenizer, [e.for_model(tokenizer) for e in examples], num_samples=settings.num_samples,
                           temperature=settings.temperature, top_p=settings.top_p,
                           max_new_tokens=settings.max_new_tokens, seed=settings.seed, batch_size=settings.batch_size)
    pair_rows, scored_rows, counts = pairs_from_samples(examples, samples, score, settings, tokenizer)
    counts["repeated_prompts"] = report.deduplicated
    if not pair_rows:
        raise DataError(f"{name}: no pairs from {counts['samples']} samples of {counts['prompts']} prompts "
                        f"({_drops(counts, settings)}); nothing written")
    write_jsonl(pair_rows, str(output))
    if scored_output is not None:
        write_jsonl(scored_rows, str(scored_output))
    scores = [r[k] for r in pair_rows for k in ("score_chosen", "score_rejected")]
    return {**counts, "output": str(output), "scored_output": scored_output, "scored_rows": len(scored_rows),
            "source": report.summary(),
            "mean_score_chosen": sum(scores[0::2]) / len(pair_rows),
            "mean_score_rejected": sum(scores[1::2]) / len(pair_rows)}


def _drops(counts: dict, settings: PairSettings) -> str:
    unfinished = (f"{counts['unfinished']} cut at max_new_tokens={settings.max_new_tokens}"
                  + ("" if settings.keep_unfinished else " (dropped)"))
    return (f"{unfinished}, {counts['empty']} empty (dropped), {counts['repeated']} repeating an earlier sample "
            f"(scored once), {counts['scored']} scored, "
            f"{counts['prompts_without_pair']} prompts without a pair (fewer than 2 samples left, or scores tied or "
            f"closer than min_score_gap={settings.min_score_gap})")


def summary_lines(result: dict, settings: PairSettings) -> list[str]:
    return [f"{result['output']}: {result['pairs']} pairs from {result['prompts']} prompts x {settings.num_samples} "
            f"samples ({result['repeated_prompts']} repeated prompts read once)",
            f"samples: {_drops(result, settings)}",
            f"mean score: chosen {result['mean_score_chosen']:.4f}, rejected {result['mean_score_rejected']:.4f}",
            *([f"{result['scored_output']}: the scored samples of {result['scored_rows']} prompts (those with at "
               "least two; a scored row needs two)"] if result["scored_output"] else [])]


def main(argv: list[str]) -> int:
    from dpokit.options import Parser, integer, json_object, number, positive_float, positive_int, seed, top_p

    # Each PairSettings range where the option is read (PairSettings.check holds them for callers in Python).
    types = {"num_samples": integer("[2, inf)"), "temperature": positive_float, "top_p": top_p,
             "max_new_tokens": positive_int, "seed": seed, "batch_size": positive_int,
             "min_score_gap": number("[0, inf)")}
    parser = Parser(prog="dpokit pairs", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--model", required=True, reads=True, help="the model to sample from: a run directory or a model path")
    parser.add_argument("--prompts", required=True, reads=True,
                        help="prompts (a 'prompt' column: text or messages) or any preference / SFT data file")
    parser.add_argument("--judge", required=True, help="implicit | module:function | rm:PATH (reward model)")
    parser.add_argument("--output", required=True, writes=True, help="pairs, .jsonl or .jsonl.gz")
    parser.add_argument("--scored_output", writes=True, help="also the scored samples, as scored rows (.jsonl)")
    parser.add_argument("--ref", reads=True, help="reference for the implicit judge (default: the model the run started from)")
    parser.add_argument("--beta", type=positive_float, help="beta of the implicit judge (default: the run's, else 0.1)")
    parser.add_argument("--column_map", type=json_object, help='JSON, e.g. \'{"question": "prompt"}\'')
    parser.add_argument("--chat_template", metavar="FILE", reads=True, help="Jinja chat template for message prompts")
    defaults = PairSettings()
    for f, option_type in types.items():
        parser.add_argument(f"--{f}", type=option_type, default=getattr(defaults, f))
    parser.add_argument("--pair_strategy", default=defaults.pair_strategy,
                        help="best_vs_worst (default), best_vs_rest or all_pairs")
    parser.add_argument("--keep_unfinished", action="store_true",
                        help="also pair samples cut at max_new_tokens (dropped by default)")
    args = parser.parse_args(argv)
    settings = PairSettings(**{f: getattr(args, f) for f in PairSettings.__dataclass_fields__})
    result = create_pairs(args.model, args.prompts, args.judge, args.output, ref=args.ref, settings=settings,
                          scored_output=args.scored_output, beta=args.beta, column_map=args.column_map,
                          chat_template=args.chat_template)
    print("\n".join(summary_lines(result, settings)))
    return 0
