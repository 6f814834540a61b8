"""The ``dpokit data`` commands: check, convert, filter, split, audit (`dpokit.data.audit`).

Each ``<command>_main(argv) -> int`` takes the arguments after ``dpokit data <command>`` and returns the exit code;
`main(argv)` dispatches on ``argv[0]``. A `DpokitError` (unreadable file, undetectable format, no usable row, bad
option) prints one line to stderr and returns 2.

- ``check FILE [--tokenizer T [--chat_template FILE]] [--max_length N] [--max_prompt_length N] [--max_completion_length N] [--eval FILE]``:
  rows, detected format, malformed rows, exact / near duplicates, whitespace-only completions (kept, but counted),
  share of pairs whose chosen is longer than the rejected, with a tokenizer token-length percentiles and what each
  truncation setting would cut or drop (including pairs whose chosen and rejected become identical), and prompts
  found in both FILE and the eval file. Conversational data needs a chat template: the tokenizer's, or
  ``--chat_template FILE`` for a tokenizer without one. Exit 0: clean; 1: problems found (malformed rows, exact
  duplicates, prompts shared with the eval file); 2: unusable input, reported before any line of the report.
- ``convert IN OUT``: canonical JSON Lines (see `canonical_row`), bad rows skipped and reported.
- ``filter IN OUT [--dedup] [--tokenizer T [--chat_template FILE] --max_length N [--drop_truncated]]``: canonical rows that are valid,
  optionally not exact duplicates and not dropped (or, with ``--drop_truncated``, not cut) by truncation; as in
  training, a pair whose chosen and rejected ids are identical once truncated is dropped. ``--audit FILE --drop_top
  K`` also drops the K most suspect pairs of a `dpokit data audit` of IN, and ``--add FILE`` appends the rows of
  another file (e.g. those pairs as people re-labelled them, from `dpokit annotate export`).
- ``split IN --eval_fraction F --train_out A --eval_out B [--seed S]``: all rows sharing a prompt go to the same side.
  A and B must be two files, neither of them IN.

Common options: ``--kind preference|sft`` (default preference), ``--format NAME``, ``--column_map JSON``,
``--pair_strategy``, ``--min_score_gap`` (scored data).
"""

from __future__ import annotations

import gzip
import json
import math
import random
import re
import sys
from dataclasses import dataclass

from dpokit.data.examples import DataReport, PreferenceExample, SFTExample, example_key, prompt_key
from dpokit.data.formats import PAIR_STRATEGIES, preference_examples, sft_examples
from dpokit.data.readers import load_rows
from dpokit.errors import ConfigError, DataError, DpokitError
from dpokit.fileio import atomic_path
from dpokit.options import Parser, integer, json_object, number, positive_int, seed

DEFAULT_CHECK_LENGTHS = (512, 1024, 2048)
PERCENTILES = (50, 90, 99)


class _Parser(Parser):
    """The shared parser, its argparse errors naming the data command."""

    def error(self, message):
        raise ConfigError(f"dpokit data {self.prog}: {message}")


def _parser(prog: str, description: str) -> _Parser:
    p = _Parser(prog=prog, description=description)
    p.add_argument("--kind", choices=("preference", "sft"), default="preference", help="what the rows hold")
    p.add_argument("--format", default="auto", help="dataset format name (default: detect)")
    p.add_argument("--column_map", type=json_object, default=None, help='JSON, e.g. \'{"question": "prompt"}\'')
    p.add_argument("--split", default="train", help="split of a save_to_disk DatasetDict")
    p.add_argument("--pair_strategy", choices=PAIR_STRATEGIES, default="best_vs_worst", help="scored data only")
    p.add_argument("--min_score_gap", type=number("[0, inf)"), default=0.0, help="scored data only")
    return p


def _examples(path: str, args, *, on_bad_rows: str = "skip", deduplicate: bool = False, tokenizer=None):
    """Validated examples of `path`; with a `tokenizer`, message data is refused up front (naming the file) when it
    has no chat template, before anything is printed."""
    rows, name = load_rows(path, split=args.split)
    has_template = None if tokenizer is None else bool(getattr(tokenizer, "chat_template", None))
    if args.kind == "sft":
        return sft_examples(rows, name, dataset_format=args.format, column_map=args.column_map,
                            on_bad_rows=on_bad_rows, deduplicate=deduplicate, chat_template_available=has_template)
    return preference_examples(rows, name, dataset_format=args.format, column_map=args.column_map,
                               on_bad_rows=on_bad_rows, pair_strategy=args.pair_strategy,
                               min_score_gap=args.min_score_gap, deduplicate=deduplicate,
                               chat_template_available=has_template)


def _run(body, argv) -> int:
    """`body(argv)`'s exit code; a DpokitError is one line (exit 2, or its own code: 1 for a failed write)."""
    try:
        return body(argv)
    except DpokitError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return getattr(e, "exit_code", 2)


# --------------------------------------------------------------------------------------------- canonical rows


def canonical_row(example: PreferenceExample | SFTExample) -> dict:
    """The canonical JSON object for an example; reading it back gives the same example.

    Preference: ``{"prompt", "chosen", "rejected"}`` (+ ``"system"`` when set) with strings (standard) or message
    lists (conversational; a system prompt is the first prompt message). SFT: ``{"prompt", "completion"}``, or
    ``{"text"}`` for an example with an empty prompt.
    """
    if isinstance(example, PreferenceExample):
        row = {"prompt": example.prompt, "chosen": example.chosen, "rejected": example.rejected}
    elif example.prompt == "":
        row = {"text": example.completion}
    else:
        row = {"prompt": example.prompt, "completion": example.completion}
    if example.system is not None:
        row["system"] = example.system
    return row


def write_jsonl(rows, path: str) -> None:
    """Write rows as UTF-8 JSON Lines (gzip when the name ends in .gz)."""
    if not (path.endswith(".jsonl") or path.endswith(".jsonl.gz")):
        raise ConfigError(f"{path}: output must be a .jsonl or .jsonl.gz file")
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with atomic_path(path) as tmp:  # a crash or a full disk never leaves half a file where a good one was
        if path.endswith(".gz"):
            with gzip.open(tmp, "wt", encoding="utf-8") as f:
                f.write(text)
        else:
            tmp.write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------------------------- check


def _text_of(value) -> str:
    """A field as plain text (message lists joined), for duplicate and length comparisons."""
    if isinstance(value, str):
        return value
    return "\n".join(f"{m['role']}: {m['content']}" for m in value)


def _near_key(example) -> str:
    """Key equal for examples that differ only in case, whitespace and punctuation."""
    fields = [example.prompt, example.chosen, example.rejected] if isinstance(example, PreferenceExample) \
        else [example.prompt, example.completion]
    return "\x00".join(re.sub(r"[\W_]+", " ", _text_of(f).lower()).strip() for f in fields)


@dataclass
class _Duplicates:
    exact: list[tuple[int, int]]  # (row, row of its first copy)
    near: list[tuple[int, int]]


def find_duplicates(examples) -> _Duplicates:
    """Exact duplicates (equal prompt, completions, system) and near duplicates (equal after `_near_key`)."""
    exact, near, first_exact, first_near = [], [], {}, {}
    for ex in examples:
        key, nkey = example_key(ex), _near_key(ex)
        if key in first_exact:
            exact.append((ex.row, first_exact[key]))
        elif nkey in first_near:
            near.append((ex.row, first_near[nkey]))
        first_exact.setdefault(key, ex.row)
        first_near.setdefault(nkey, ex.row)
    return _Duplicates(exact, near)


def _percentiles(values: list[int]) -> str:
    ordered = sorted(values)
    picks = [ordered[min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1)] for p in PERCENTILES]
    return " ".join(f"p{p}={v}" for p, v in zip(PERCENTILES, picks)) + f" max={ordered[-1]}"


def _tokenizer_option(p: _Parser) -> None:
    p.add_argument("--tokenizer", reads=True, help="tokenizer directory or hub id, for token lengths and truncation")
    p.add_argument("--chat_template", metavar="FILE", reads=True,
                   help="Jinja chat template file for conversational data (the tokenizer's own is replaced)")


def _length_options(p: _Parser) -> None:
    for name in ("--max_length", "--max_prompt_length", "--max_completion_length"):
        p.add_argument(name, type=positive_int)


def _tokenizer_from(args):
    if args.chat_template is not None and not args.tokenizer:
        raise ConfigError("--chat_template needs --tokenizer (the template renders for that tokenizer)")
    if not args.tokenizer:
        return None
    from dpokit.fileio import read_text
    from dpokit.models import load_tokenizer

    # The data tools never pad, so the tokenizer's padding is left as it is.
    template = read_text(args.chat_template, "--chat_template") if args.chat_template is not None else None
    tokenizer = load_tokenizer(args.tokenizer, pad=False)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def _blank(value) -> bool:
    """A completion that is only whitespace (text, or every message's content)."""
    if isinstance(value, str):
        return not value.strip()
    return all(not m["content"].strip() for m in value)


def _blank_completions(examples, report: DataReport, args, out) -> None:
    """Count (and list a few) whitespace-only completions. They are kept on purpose (in HH the chosen reply " ",
    saying nothing, is a real preference), so this is information, not a problem; but never unseen."""
    if args.kind == "sft":
        blank = [(e.row, "completion") for e in examples if _blank(e.completion)]
        print(f"examples with a whitespace-only completion (kept, trained on as given): {len(blank)}", file=out)
    else:
        blank = [(e.row, name) for e in examples for name in ("chosen", "rejected") if _blank(getattr(e, name))]
        print(f"pairs with a whitespace-only chosen or rejected (kept, trained on as given): "
              f"{len({row for row, _ in blank})}", file=out)
    for row, name in blank[: args.show]:
        print(f"  {report.where(row)} {name}", file=out)


def _token_report(parts, tokenizer, args, out) -> None:
    """Length percentiles of the (prompt ids, [completion ids]) `parts`, and what each truncation setting would cut
    or drop (a pair whose chosen and rejected ids end up identical is dropped, as training drops it)."""
    from dpokit.data.tokenize import _identical, _Limits, _truncate

    names = ("prompt", "completion") if args.kind == "sft" else ("prompt", "chosen", "rejected")
    print(f"token lengths ({getattr(tokenizer, 'name_or_path', '')}):", file=out)
    columns = [[len(p) for p, _ in parts]] + [[len(c[k]) for _, c in parts] for k in range(len(names) - 1)]
    columns.append([len(p) + max(len(x) for x in c) for p, c in parts])
    for name, values in zip(names + ("total",), columns):
        print(f"  {name}: {_percentiles(values)}", file=out)
    if args.kind == "preference":
        longer = sum(len(c[0]) > len(c[1]) for _, c in parts)
        print(f"chosen longer than rejected (tokens): {100 * longer / len(parts):.1f}% of pairs", file=out)
    lengths = [args.max_length] if args.max_length else list(DEFAULT_CHECK_LENGTHS)
    for max_length in lengths:
        for mode in ("keep_start", "keep_end"):
            limits = _Limits(max_length, args.max_prompt_length, args.max_completion_length, mode)
            cut_p = cut_c = dropped = identical = 0
            for prompt, comps in parts:
                r = _truncate(list(prompt), [list(c) for c in comps], limits, tokenizer.bos_token_id)
                if r is None or _identical(r[1]):
                    dropped += 1
                    identical += r is not None
                else:
                    cut_p += r[2]
                    cut_c += r[3]
            same = f" ({identical} with chosen identical to rejected once cut)" if args.kind == "preference" else ""
            print(f"truncation max_length={max_length} max_prompt_length={args.max_prompt_length} "
                  f"max_completion_length={args.max_completion_length} {mode}: {cut_p} prompts cut, "
                  f"{cut_c} rows with a completion cut, {dropped} rows dropped{same}", file=out)


def _check(argv) -> int:
    p = _parser("check", "Report on a dataset's health; exit 0 clean, 1 problems found, 2 unusable.")
    p.add_argument("file", reads=True)
    _tokenizer_option(p)
    _length_options(p)
    p.add_argument("--eval", reads=True, help="held-out file: prompts it shares with FILE are reported")
    p.add_argument("--show", type=integer("[0, inf)"), default=5, help="how many bad or duplicate rows to list")
    args = p.parse_args(argv)
    out = sys.stdout
    tokenizer = _tokenizer_from(args)
    if tokenizer is None and args.max_length:
        raise ConfigError("--max_length needs --tokenizer (lengths are counted in tokens)")
    # Everything that can make the input unusable (exit 2) is read, validated and tokenized before the first line
    # is printed: an error then stands alone, never after half a report.
    examples, report = _examples(args.file, args, tokenizer=tokenizer)
    parts = None
    if tokenizer is not None:
        from dpokit.data.tokenize import token_ids

        parts = token_ids(examples, tokenizer, report=report)
    held = _examples(args.eval, args) if args.eval else None
    problems = []
    print(f"{report.source}: {report.read} rows, format {report.format}, {report.kept} "
          f"{'pairs' if report.format == 'scored' else 'usable'}", file=out)
    if report.format == "scored":
        print(f"scored rows without a pair: {report.unpaired}", file=out)
    print(f"malformed rows: {report.skipped}", file=out)
    for s in report.skipped_rows[: args.show]:
        print(f"  {s['reason']}", file=out)
    if report.skipped:
        problems.append(f"{report.skipped} malformed rows")
    dups = find_duplicates(examples)
    print(f"exact duplicates: {len(dups.exact)}", file=out)
    for row, first in dups.exact[: args.show]:
        print(f"  {report.where(row)} repeats {report.where(first)}", file=out)
    if dups.exact:
        problems.append(f"{len(dups.exact)} exact duplicates")
    print(f"near duplicates (same text up to case, spaces, punctuation): {len(dups.near)}", file=out)
    for row, first in dups.near[: args.show]:
        print(f"  {report.where(row)} ~ {report.where(first)}", file=out)
    _blank_completions(examples, report, args, out)
    if args.kind == "preference":
        longer = sum(len(_text_of(e.chosen)) > len(_text_of(e.rejected)) for e in examples)
        print(f"chosen longer than rejected (characters): {100 * longer / len(examples):.1f}% of pairs", file=out)
    if parts is not None:
        _token_report(parts, tokenizer, args, out)
    if held is not None:
        eval_examples, eval_report = held
        eval_prompts = {prompt_key(e) for e in eval_examples}
        shared = {prompt_key(e) for e in examples} & eval_prompts
        print(f"prompts also in {eval_report.source}: {len(shared)}", file=out)
        if shared:
            problems.append(f"{len(shared)} prompts shared with {eval_report.source}")
    print(f"result: {'; '.join(problems) if problems else 'clean'}", file=out)
    return 1 if problems else 0


def check_main(argv) -> int:
    """``dpokit data check`` (module docstring); returns 0 clean, 1 problems found, 2 unusable input."""
    return _run(_check, argv)


# --------------------------------------------------------------------------------------------- convert / filter


def _rewrite_parser(prog: str, description: str) -> _Parser:
    """The parser of a command that reads INPUT and writes canonical rows to OUTPUT (never INPUT itself: the rows
    it leaves out, and the columns it does not keep, would be gone)."""
    p = _parser(prog, description)
    p.add_argument("input", metavar="INPUT", reads=True)
    p.add_argument("output", metavar="OUTPUT", writes=True)
    return p


def _write_canonical(examples, report: DataReport, output: str) -> int:
    write_jsonl([canonical_row(e) for e in examples], output)
    print(f"{output}: wrote {len(examples)} rows; {report.summary()}")
    return 0


def _convert(argv) -> int:
    args = _rewrite_parser("convert", "Write a dataset as canonical JSON Lines.").parse_args(argv)
    return _write_canonical(*_examples(args.input, args), args.output)


def convert_main(argv) -> int:
    """``dpokit data convert IN OUT``: canonical JSONL; returns 0, or 2 for unusable input."""
    return _run(_convert, argv)


def _filter(argv) -> int:
    p = _rewrite_parser("filter", "Keep the valid (and optionally unique, untruncated) rows, as canonical JSON Lines.")
    p.add_argument("--dedup", action="store_true", help="drop exact duplicates of an earlier row")
    _tokenizer_option(p)
    _length_options(p)
    p.add_argument("--truncation_mode", default="keep_start")
    p.add_argument("--drop_truncated", action="store_true", help="also drop rows that truncation would cut")
    p.add_argument("--audit", reads=True, help="a `dpokit data audit` of the input: with --drop_top K, drop its K most suspect")
    p.add_argument("--drop_top", type=positive_int, help="how many of the audit's most suspect pairs to drop")
    p.add_argument("--add", metavar="FILE", reads=True, help="append the valid rows of FILE (e.g. re-labelled pairs)")
    args = p.parse_args(argv)
    if (args.audit is None) != (args.drop_top is None):
        raise ConfigError("--audit and --drop_top go together: --audit audit.jsonl --drop_top K")
    limited = any(v is not None for v in (args.max_length, args.max_prompt_length, args.max_completion_length))
    if limited and not args.tokenizer:
        raise ConfigError("length limits need --tokenizer (lengths are counted in tokens)")
    tokenizer = _tokenizer_from(args) if limited else None
    examples, report = _examples(args.input, args, deduplicate=args.dedup, tokenizer=tokenizer)
    notes = ""
    if args.audit is not None:
        from dpokit.data.audit import audited_rows

        drop = audited_rows(args.audit, args.drop_top, examples, report)
        examples = [e for e in examples if e.row not in drop]
        notes += f"; {len(drop)} most suspect pairs of {args.audit} dropped"
    if limited:
        examples = _within_limits(examples, tokenizer, args, report)
    rows = [canonical_row(e) for e in examples]
    if args.add is not None:
        added, added_report = _examples(args.add, args, deduplicate=args.dedup, tokenizer=tokenizer)
        rows += [canonical_row(e) for e in added]
        notes += f"; {len(added)} rows of {args.add} added ({added_report.summary()})"
    write_jsonl(rows, args.output)
    print(f"{args.output}: wrote {len(rows)} rows; {report.summary()}{notes}")
    return 0


def _within_limits(examples, tokenizer, args, report: DataReport):
    """The examples that training with these limits would keep (with ``--drop_truncated``: keep uncut); the others
    are counted in `report` as training counts them."""
    from dpokit.data.tokenize import _identical, _Limits, _truncate, token_ids

    limits = _Limits(args.max_length, args.max_prompt_length, args.max_completion_length, args.truncation_mode)
    kept = []
    for ex, (prompt, comps) in zip(examples, token_ids(examples, tokenizer, report=report)):
        r = _truncate(list(prompt), [list(c) for c in comps], limits, tokenizer.bos_token_id)
        identical = r is not None and _identical(r[1])
        if r is None or identical or (args.drop_truncated and (r[2] or r[3])):
            report.dropped += 1
            report.identical_after_truncation += identical
            report.kept -= 1
            continue
        kept.append(ex)
    if not kept:
        raise DataError(f"{report.source}: every row would be dropped by these length limits")
    return kept


def filter_main(argv) -> int:
    """``dpokit data filter IN OUT``; returns 0, or 2 for unusable input."""
    return _run(_filter, argv)


# --------------------------------------------------------------------------------------------- split


def split_by_prompt(examples, eval_fraction: float, seed: int) -> tuple[list, list]:
    """Split examples so that all examples sharing a prompt land on the same side.

    The distinct prompts are shuffled with `seed`; the first ``ceil(eval_fraction * n_prompts)`` go to eval.
    Order within each side follows the input.
    """
    prompts = list(dict.fromkeys(prompt_key(e) for e in examples))
    random.Random(seed).shuffle(prompts)
    eval_prompts = set(prompts[: math.ceil(eval_fraction * len(prompts))])
    train = [e for e in examples if prompt_key(e) not in eval_prompts]
    held = [e for e in examples if prompt_key(e) in eval_prompts]
    return train, held


def _split(argv) -> int:
    p = _parser("split", "Split into train and eval by prompt (no prompt on both sides).")
    p.add_argument("input", metavar="INPUT", reads=True)
    p.add_argument("--eval_fraction", type=number("(0, 1)"), required=True)
    # Neither may be INPUT (replaced by its train part) nor the other (the eval part would replace the train part:
    # half the data gone, exit 0): the parser refuses both.
    p.add_argument("--train_out", required=True, writes=True)
    p.add_argument("--eval_out", required=True, writes=True)
    p.add_argument("--seed", type=seed, default=0)
    args = p.parse_args(argv)
    examples, report = _examples(args.input, args)
    train, held = split_by_prompt(examples, args.eval_fraction, args.seed)
    if not train:
        raise DataError(f"{report.source}: only {len({prompt_key(e) for e in examples})} distinct prompts; "
                        f"--eval_fraction {args.eval_fraction} leaves none for training")
    write_jsonl([canonical_row(e) for e in train], args.train_out)
    write_jsonl([canonical_row(e) for e in held], args.eval_out)
    print(f"{args.train_out}: {len(train)} rows; {args.eval_out}: {len(held)} rows; {report.summary()}")
    return 0


def split_main(argv) -> int:
    """``dpokit data split IN --eval_fraction F --train_out A --eval_out B``; returns 0, or 2 for unusable input."""
    return _run(_split, argv)


def audit_main(argv) -> int:
    """``dpokit data audit`` (`dpokit.data.audit`, imported on use: it loads models)."""
    from dpokit.data.audit import main as audit

    return audit(argv)


COMMANDS = {"check": check_main, "convert": convert_main, "filter": filter_main, "split": split_main,
            "audit": audit_main}


def main(argv) -> int:
    """Dispatch ``dpokit data <command> ...`` (argv starts with the command name)."""
    if not argv or argv[0] not in COMMANDS:
        given = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(f"error: dpokit data: {given}; one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])
