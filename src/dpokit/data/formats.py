"""Turning rows of preference / SFT data into canonical examples.

Pipeline: `load_rows(source)` (`dpokit.data.readers`) -> rows (a list of dicts or a `datasets.Dataset`) ->
`preference_examples(rows, ...)` or `sft_examples(rows, ...)` -> validated, canonical `PreferenceExample` /
`SFTExample` objects plus a `DataReport` (`dpokit.data.examples`). The field rules every format shares are in
`dpokit.data.validation`.

Preference formats (`dataset_format=`; `auto` detects them from the columns and the first row's types):

- ``standard``: ``prompt``, ``chosen``, ``rejected`` strings, optional ``system`` string.
- ``conversational``: ``prompt`` a list of messages ``{"role", "content"}`` (system/user/assistant/tool) ending with a
  user (or tool) message; ``chosen`` / ``rejected`` lists of assistant messages. An optional ``system`` string column
  becomes a leading system message.
- ``implicit_conversational``: only ``chosen`` / ``rejected``, each a whole conversation (message list). The prompt is
  the messages before the trailing assistant turn; both conversations must share it exactly. A text ``prompt``
  column beside such conversations (UltraFeedback-binarized) is redundant, as TRL treats it: the prompt still comes
  from the conversations, and the text must equal one of its user turns (else the row is an error).
- ``implicit_hh``: only ``chosen`` / ``rejected``, each a raw Anthropic HH transcript
  ``"\\n\\nHuman: ... \\n\\nAssistant: ..."``. The data stays text: the prompt is the transcript up to and including
  the ``"\\n\\nAssistant:"`` marker that answers the last Human turn, the completions are the text after it (see
  `split_hh_transcript`). `parse_hh_transcript` turns a transcript into messages when a chat template is wanted.

- ``scored``: ``prompt`` plus several rated completions, as ``completions``, a list of ``{"text": ..., "score":
  number}``, or as two parallel lists ``responses`` (texts) and ``scores`` (numbers). UltraFeedback rows work as they
  are: a completion's text may be under ``response``, its score under ``overall_score`` or ``fine-grained_score``, or
  come from ``annotations: {aspect: {"Rating": "4", ...}}`` as the MEAN of the numeric ratings (numeric strings count,
  "N/A" is left out). A completion's score is read from the first of ``score``, ``overall_score``,
  ``fine-grained_score``, ``annotations`` it has, and every completion of a row must use the same one (a 1-10
  overall score is not comparable to a 1-5 rating). Pairs are formed per `pair_strategy`: ``best_vs_worst``
  (one pair per row), ``best_vs_rest`` (the best against each other completion) or ``all_pairs`` (every two
  completions, higher score chosen); a pair needs ``score_chosen - score_rejected >= min_score_gap`` AND a strictly
  higher chosen score, so ties never become pairs. Among equal scores the first completion listed is used. A text
  listed more than once in a row counts once, at its first place, scored with the MEAN of its scores: pairs are
  chosen among distinct texts, so a text is never paired with itself nor both above and below another (a row with
  one distinct text gives no pair and counts as unpaired).

An ``input`` (or ``context``) column, as in Alpaca-style data, is folded into the prompt of the standard, scored
and (SFT) prompt_completion formats as ``prompt + "\n\n" + input`` (for a message prompt: appended the same way to
the last prompt message); an empty input adds nothing.

Message ``content`` is a string, or a list of text parts ``[{"type": "text", "text": ...}, ...]`` (the OpenAI / HF
multimodal message shape holding text only), read as the parts' texts joined with ``"\n"``. Any other part (image,
audio, ...) is refused naming it: dpokit trains text-only LMs.

SFT formats: ``prompt_completion`` (``prompt`` / ``completion`` strings), ``conversational_prompt_completion``
(message lists), ``messages`` (one conversation; the last message is the completion, which must be an assistant
message) and ``text`` (one string; empty prompt, everything is trained on).

Row numbers. `PreferenceExample.row` / `SFTExample.row` is the 0-based index of the row in the loaded rows (what
`rows[i]` returns). Error messages print 1-based positions: ``train.jsonl:17`` is line 17 of a JSON Lines file
(blank lines are skipped but still counted), ``train.csv row 17`` is the 17th data row (header not counted) of any
other source. `DataReport.where(row)` turns a 0-based row index into that text.

Validation. Every user mistake (missing or empty field, wrong type, chosen identical to rejected, unknown role or bad
turn order, invalid Unicode) is a one-line `DataError` naming the source, the row and the field. With
``on_bad_rows="error"`` the rows are all checked first and one error names the first problem and how many more there
are; with ``on_bad_rows="skip"`` bad rows are dropped and listed, with their reason, in `DataReport.skipped_rows`.
An empty string is a missing value; a string of whitespace is kept (in HH the chosen reply " " - saying nothing - is
a real preference).
"""

from __future__ import annotations

import re
from typing import Any, Callable

from dpokit.data.examples import (
    DataReport,
    Message,
    PreferenceExample,
    PromptExample,
    SFTExample,
    example_digest,
    prompt_key,
    where,
)
from dpokit.data.readers import RowList
from dpokit.data.validation import (
    RowProblem,
    assistant_messages,
    finite_number,
    fold_input,
    message_list,
    not_identical,
    optional_text,
    prompt_messages,
    split_conversation,
    text_value,
    with_system,
)
from dpokit.errors import ConfigError, DataError
from dpokit.fileio import json_type_name

PREFERENCE_FORMATS = ("standard", "conversational", "implicit_conversational", "implicit_hh", "scored")
PAIR_STRATEGIES = ("best_vs_worst", "best_vs_rest", "all_pairs")
SCORED_TEXT_KEYS = ("text", "response")  # where a scored completion keeps its text, in this order of preference
# Where a scored completion keeps its score, in this order of preference; "annotations" (UltraFeedback's per-aspect
# ratings) is used last, as the mean of its numeric ratings (see `_annotation_score`).
SCORED_SCORE_KEYS = ("score", "overall_score", "fine-grained_score", "annotations")
SFT_FORMATS = ("prompt_completion", "conversational_prompt_completion", "messages", "text")
ON_BAD_ROWS = ("error", "skip")
MAX_LISTED_PROBLEMS = 5  # kept on the raised DataError as `.problems`; the message itself names only the first

# ---------------------------------------------------------------------------------------------------------------
# HH transcripts
# ---------------------------------------------------------------------------------------------------------------

# A turn marker: "Human:" / "Assistant:" at the very start of the text or after a blank line. An inline "Human:"
# (HH has a few replies that quote one) is part of the turn's text, as it is in the original data.
_HH_MARKER = re.compile(r"(?:\A|\n\n)(Human|Assistant):")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}


def split_hh_transcript(text: str) -> tuple[str, str]:
    """Split a raw HH transcript into ``(prompt, completion)`` text with ``prompt + completion == text``.

    The prompt ends with the ``"\\n\\nAssistant:"`` marker that answers the LAST Human turn; the completion is all
    text after it (normally the final assistant turn; in the few HH rows that end with two assistant turns in a row,
    both). Raises ValueError (with a short reason) when `text` has no Human turn followed by an Assistant turn.
    """
    markers = list(_HH_MARKER.finditer(text))
    if not markers or text[: markers[0].start()].strip():
        raise ValueError("not an HH transcript (expected '\\n\\nHuman: ... \\n\\nAssistant: ...')")
    humans = [i for i, m in enumerate(markers) if m.group(1) == "Human"]
    if not humans:
        raise ValueError("HH transcript has no 'Human:' turn")
    answer = next((m for m in markers[humans[-1] + 1:] if m.group(1) == "Assistant"), None)
    if answer is None:
        raise ValueError("HH transcript does not end with an 'Assistant:' turn after its last 'Human:' turn")
    return text[: answer.end()], text[answer.end():]


def parse_hh_transcript(text: str) -> list[Message]:
    """Parse a raw HH transcript into messages ``[{"role": "user"|"assistant", "content": str}, ...]``.

    The content of a turn is the text between its marker and the next one, minus the single space that follows the
    colon, so rendering ``"\\n\\nHuman: " + content`` / ``"\\n\\nAssistant: " + content`` turn by turn gives the
    transcript back. Raises ValueError when `text` does not start with a turn marker.
    """
    markers = list(_HH_MARKER.finditer(text))
    if not markers or text[: markers[0].start()].strip():
        raise ValueError("not an HH transcript (expected '\\n\\nHuman: ... \\n\\nAssistant: ...')")
    messages = []
    for m, nxt in zip(markers, markers[1:] + [None]):
        content = text[m.end(): nxt.start() if nxt is not None else len(text)]
        if content.startswith(" "):
            content = content[1:]
        messages.append({"role": _HH_ROLE[m.group(1)], "content": content})
    return messages


# ---------------------------------------------------------------------------------------------------------------
# Row validation
# ---------------------------------------------------------------------------------------------------------------


def _standard(row: dict, index: int) -> PreferenceExample:
    prompt, chosen, rejected = fold_input(row, text_value(row, "prompt")), text_value(row, "chosen"), text_value(row, "rejected")
    not_identical(chosen, rejected)
    return PreferenceExample(prompt, chosen, rejected, index, optional_text(row, "system"))


def _conversational(row: dict, index: int) -> PreferenceExample:
    prompt = fold_input(row, with_system(row, prompt_messages(message_list(row.get("prompt"), "prompt"), "prompt")))
    chosen = assistant_messages(message_list(row.get("chosen"), "chosen"), "chosen")
    rejected = assistant_messages(message_list(row.get("rejected"), "rejected"), "rejected")
    not_identical(chosen, rejected)
    return PreferenceExample(prompt, chosen, rejected, index)


def _implicit_conversational(row: dict, index: int) -> PreferenceExample:
    prompt, chosen = split_conversation(message_list(row.get("chosen"), "chosen"), "chosen")
    prompt_r, rejected = split_conversation(message_list(row.get("rejected"), "rejected"), "rejected")
    if prompt != prompt_r:
        at = next((i for i, (a, b) in enumerate(zip(prompt, prompt_r)) if a != b), min(len(prompt), len(prompt_r)))
        raise RowProblem("rejected", f"conversation differs from 'chosen' at message {at}, before the final assistant turn")
    if row.get("prompt") is not None:
        # A redundant text prompt beside whole conversations: it must be one of their user turns, or the row says
        # two different things and neither reading is safe.
        text = text_value(row, "prompt").strip()
        if not any(m["role"] == "user" and m["content"].strip() == text for m in prompt):
            raise RowProblem("prompt", "does not match any user turn of the conversation in 'chosen' (with whole "
                                        "conversations in chosen/rejected the prompt is read from them)")
    not_identical(chosen, rejected)
    return PreferenceExample(with_system(row, prompt), chosen, rejected, index)


def _implicit_hh(row: dict, index: int) -> PreferenceExample:
    parts = {}
    for name in ("chosen", "rejected"):
        text = text_value(row, name)
        try:
            parts[name] = split_hh_transcript(text)
        except ValueError as e:
            raise RowProblem(name, str(e)) from None
    (prompt, chosen), (prompt_r, rejected) = parts["chosen"], parts["rejected"]
    if prompt != prompt_r:
        at = next((i for i, (a, b) in enumerate(zip(prompt, prompt_r)) if a != b), min(len(prompt), len(prompt_r)))
        raise RowProblem("rejected", f"transcript differs from 'chosen' at character {at + 1}, before the final Assistant turn")
    if chosen == "":
        raise RowProblem("chosen", "empty final Assistant turn")
    if rejected == "":
        raise RowProblem("rejected", "empty final Assistant turn")
    not_identical(chosen, rejected)
    return PreferenceExample(prompt, chosen, rejected, index)


def _annotation_score(annotations: Any, name: str) -> float:
    """UltraFeedback ``annotations``: ``{aspect: {"Rating": "4", "Rationale": ...}, ...}`` -> the mean of the
    numeric ratings (numbers or numeric strings); non-numeric ratings such as "N/A" are left out of the mean."""
    if not isinstance(annotations, dict) or not annotations:
        raise RowProblem(name, f"expected an object of aspect ratings, got {json_type_name(annotations)}")
    ratings = []
    for aspect, value in annotations.items():
        if not isinstance(value, dict) or "Rating" not in value:
            raise RowProblem(f"{name}.{aspect}", "expected an object with a 'Rating'")
        rating = value["Rating"]
        if isinstance(rating, str):
            try:
                rating = float(rating)
            except ValueError:
                continue  # "N/A": the annotator gave no rating for this aspect
        if isinstance(rating, (int, float)) and not isinstance(rating, bool) and rating == rating \
                and rating not in (float("inf"), float("-inf")):
            ratings.append(float(rating))
    if not ratings:
        raise RowProblem(name, "no numeric Rating in any aspect")
    return sum(ratings) / len(ratings)


def _scores(items: list[dict], name: str) -> list[float]:
    """One score per completion, all read from the same key (module docstring): scores from different scales (a
    1-10 overall_score against a 1-5 fine-grained mean) must not be compared."""
    keys = [next((k for k in SCORED_SCORE_KEYS if item.get(k) is not None), None) for item in items]
    for i, key in enumerate(keys):
        if key is None:
            raise RowProblem(f"{name}[{i}].score", "missing")
        if key != keys[0]:
            raise RowProblem(f"{name}[{i}].{key}", f"scored by {key!r} but {name}[0] by {keys[0]!r}; use one score key per row")
    if keys[0] == "annotations":
        return [_annotation_score(item["annotations"], f"{name}[{i}].annotations") for i, item in enumerate(items)]
    return [finite_number(item[keys[0]], f"{name}[{i}].{keys[0]}") for i, item in enumerate(items)]


def _scored_text(value: Any, name: str, conversational: bool):
    if conversational:
        if isinstance(value, str):
            value = [{"role": "assistant", "content": value}]  # a plain reply to a message prompt is one assistant turn
        return assistant_messages(message_list(value, name), name)
    return text_value({name: value}, name)


def _scored_completion(item: Any, name: str, conversational: bool):
    if not isinstance(item, dict):
        raise RowProblem(name, f"expected an object with text and score, got {json_type_name(item)}")
    key = next((k for k in SCORED_TEXT_KEYS if item.get(k) is not None), "text")
    return _scored_text(item.get(key), f"{name}.{key}", conversational)


def scored_pairs(scores: list[float], strategy: str, min_score_gap: float) -> list[tuple[int, int]]:
    """(chosen index, rejected index) pairs from completion scores.

    A pair needs ``scores[c] > scores[r]`` and ``scores[c] - scores[r] >= min_score_gap``. ``best_vs_worst``: the
    first best against the first worst; ``best_vs_rest``: the first best against every other; ``all_pairs``: every
    two completions. Pairs come in the order of the completions.
    """
    def ok(c, r):
        return scores[c] > scores[r] and scores[c] - scores[r] >= min_score_gap

    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    if strategy == "best_vs_worst":
        worst = min(range(len(scores)), key=lambda i: (scores[i], i))
        return [(best, worst)] if ok(best, worst) else []
    if strategy == "best_vs_rest":
        return [(best, r) for r in range(len(scores)) if ok(best, r)]
    return [(c, r) if scores[c] > scores[r] else (r, c)
            for c in range(len(scores)) for r in range(c + 1, len(scores)) if ok(c, r) or ok(r, c)]


def _parallel_scored(row: dict, conversational: bool) -> tuple[list, list[float]]:
    """``responses`` / ``scores``: two lists of the same length, the i-th score rating the i-th response."""
    responses, scores = row.get("responses"), row.get("scores")
    if responses is None:
        raise RowProblem("responses", "missing")
    if not isinstance(responses, list):
        raise RowProblem("responses", f"expected a list of completions, got {json_type_name(responses)}")
    if scores is None:
        raise RowProblem("scores", "missing")
    if not isinstance(scores, list):
        raise RowProblem("scores", f"expected a list of numbers, got {json_type_name(scores)}")
    if len(scores) != len(responses):
        raise RowProblem("scores", f"{len(scores)} scores for {len(responses)} responses")
    if len(responses) < 2:
        raise RowProblem("responses", f"need at least 2 completions to form a pair, got {len(responses)}")
    texts = [_scored_text(r, f"responses[{i}]", conversational) for i, r in enumerate(responses)]
    return texts, [finite_number(v, f"scores[{i}]") for i, v in enumerate(scores)]


def _scored(row: dict, index: int, strategy: str, min_score_gap: float) -> list[PreferenceExample]:
    raw_prompt = row.get("prompt")
    if isinstance(raw_prompt, list):
        prompt = fold_input(row, with_system(row, prompt_messages(message_list(raw_prompt, "prompt"), "prompt")))
        system = None
    else:
        prompt, system = fold_input(row, text_value(row, "prompt")), optional_text(row, "system")
    conversational = isinstance(prompt, list)
    if "completions" not in row and ("responses" in row or "scores" in row):
        texts, scores = _parallel_scored(row, conversational)
    else:
        items = row.get("completions")
        if items is None:
            raise RowProblem("completions", "missing")
        if not isinstance(items, list):
            raise RowProblem("completions", f"expected a list of {{text, score}} objects, got {json_type_name(items)}")
        if len(items) < 2:
            raise RowProblem("completions", f"need at least 2 completions to form a pair, got {len(items)}")
        texts = [_scored_completion(item, f"completions[{i}]", conversational) for i, item in enumerate(items)]
        scores = _scores(items, "completions")
    texts, scores = _merge_repeated_texts(texts, scores)
    return [PreferenceExample(prompt, texts[c], texts[r], index, system)
            for c, r in scored_pairs(scores, strategy, min_score_gap)]


def _merge_repeated_texts(texts: list, scores: list[float]) -> tuple[list, list[float]]:
    """Each distinct text once, at its first place, scored with the mean of its scores. Pairing the listings
    themselves would pair a text with itself, or put it both above and below another text (`same`:1, `same`:5,
    `other`:3 gave other > same AND same > other), contradictory pairs to train on."""
    distinct: list = []
    listed: list[list[float]] = []
    for text, score in zip(texts, scores):
        if text in distinct:  # rows hold a handful of completions: a linear search is fine (texts may be lists)
            listed[distinct.index(text)].append(score)
        else:
            distinct.append(text)
            listed.append([score])
    return distinct, [sum(s) / len(s) for s in listed]


def _sft_prompt_completion(row: dict, index: int) -> SFTExample:
    return SFTExample(fold_input(row, text_value(row, "prompt")), text_value(row, "completion"), index, optional_text(row, "system"))


def _sft_conversational_prompt_completion(row: dict, index: int) -> SFTExample:
    prompt = fold_input(row, with_system(row, prompt_messages(message_list(row.get("prompt"), "prompt"), "prompt")))
    completion = assistant_messages(message_list(row.get("completion"), "completion"), "completion")
    return SFTExample(prompt, completion, index)


def _sft_messages(row: dict, index: int) -> SFTExample:
    messages = message_list(row.get("messages"), "messages")
    last = len(messages) - 1
    if messages[last]["role"] != "assistant":
        raise RowProblem(f"messages[{last}].role", f"the last message must be from the assistant, got {messages[last]['role']!r}")
    if last == 0:
        raise RowProblem("messages", "no user message before the assistant reply")
    prompt = prompt_messages(messages[:last], "messages")
    completion = assistant_messages(messages[last:], "messages")
    return SFTExample(with_system(row, prompt), completion, index)


def _sft_text(row: dict, index: int) -> SFTExample:
    return SFTExample("", text_value(row, "text"), index)


_PREFERENCE_PARSERS: dict[str, Callable[[dict, int], PreferenceExample]] = {
    "standard": _standard,
    "conversational": _conversational,
    "implicit_conversational": _implicit_conversational,
    "implicit_hh": _implicit_hh,
}
_SFT_PARSERS: dict[str, Callable[[dict, int], SFTExample]] = {
    "prompt_completion": _sft_prompt_completion,
    "conversational_prompt_completion": _sft_conversational_prompt_completion,
    "messages": _sft_messages,
    "text": _sft_text,
}


# ---------------------------------------------------------------------------------------------------------------
# Format detection and the row loop
# ---------------------------------------------------------------------------------------------------------------


def _columns(rows) -> list[str]:
    """Column names: a Dataset's features, or the keys seen in a list of dicts (in first-seen order)."""
    if hasattr(rows, "column_names"):
        return list(rows.column_names)
    seen: dict[str, None] = {}
    for row in rows:
        if isinstance(row, dict):
            seen.update(dict.fromkeys(row))
    return list(seen)


def _first_value(rows, name: str):
    """The first string or list found in column `name` (decides text vs. conversational)."""
    for row in rows:
        value = row.get(name) if isinstance(row, dict) else None
        if isinstance(value, (str, list)):
            return value
    return None


def _not_empty(rows, source_name: str) -> None:
    if len(rows) == 0:
        raise DataError(f"{source_name}: no rows")


def detect_preference_format(rows, source_name: str) -> str:
    """Name of the preference format of `rows` (already column-mapped), from its columns and first values."""
    _not_empty(rows, source_name)
    cols = set(_columns(rows))
    if {"prompt", "completions"} <= cols or {"prompt", "responses", "scores"} <= cols:
        return "scored"
    if {"images", "image"} & cols:
        raise DataError(f"{source_name}: column '{min({'images', 'image'} & cols)}' holds images, and dpokit trains "
                        "text-only causal LMs; remove the column to train on the text alone")
    if {"prompt", "completion", "label"} <= cols and not {"chosen", "rejected"} & cols:
        raise DataError(f"{source_name}: rows of prompt, completion and label are unpaired feedback (KTO's format); "
                        "DPO needs a chosen and a rejected completion per prompt")
    if {"prompt", "chosen", "rejected"} <= cols:
        if isinstance(_first_value(rows, "prompt"), list):
            return "conversational"
        chosen = _first_value(rows, "chosen")
        if isinstance(chosen, list):
            first = chosen[0] if chosen and isinstance(chosen[0], dict) else {}
            if first.get("role") in ("system", "user"):
                return "implicit_conversational"  # whole conversations beside a redundant text prompt
            raise DataError(f"{source_name}: 'prompt' is text but 'chosen'/'rejected' are message lists; give the "
                            "prompt as messages too ([{role: user, content: ...}]) or the completions as text")
        return "standard"
    if {"chosen", "rejected"} <= cols:
        return "implicit_conversational" if isinstance(_first_value(rows, "chosen"), list) else "implicit_hh"
    raise DataError(f"{source_name}: cannot detect a preference format from columns [{', '.join(sorted(cols))}]; "
                    f"expected prompt+chosen+rejected, chosen+rejected, prompt+completions or prompt+responses+scores (rename columns with column_map)")


def detect_sft_format(rows, source_name: str) -> str:
    """Name of the SFT format of `rows` (already column-mapped), from its columns and first values."""
    _not_empty(rows, source_name)
    cols = set(_columns(rows))
    if "messages" in cols:
        return "messages"
    if {"prompt", "completion"} <= cols:
        return "conversational_prompt_completion" if isinstance(_first_value(rows, "prompt"), list) else "prompt_completion"
    if "text" in cols:
        return "text"
    raise DataError(f"{source_name}: cannot detect an SFT format from columns [{', '.join(sorted(cols))}]; "
                    f"expected messages, prompt+completion or text (rename columns with column_map)")


def _apply_column_map(rows, column_map: dict | None, source_name: str):
    """Rename columns per `column_map` ({source column: canonical name}); returns rows of the same kind."""
    if not column_map:
        return rows
    if not isinstance(column_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in column_map.items()):
        raise ConfigError(f"column_map must map column names to column names, got {column_map!r}")
    cols = _columns(rows)
    for old, new in column_map.items():
        if old not in cols:
            raise DataError(f"{source_name}: column_map names column {old!r}, which is not in the data (columns: {', '.join(cols)})")
        if new in cols and new not in column_map:
            raise DataError(f"{source_name}: column_map renames {old!r} to {new!r}, but the data already has a {new!r} column")
    if hasattr(rows, "rename_columns"):
        return rows.rename_columns(column_map)
    renamed = [{column_map.get(k, k): v for k, v in row.items()} if isinstance(row, dict) else row for row in rows]
    line_numbers = getattr(rows, "line_numbers", None)
    return RowList(renamed, line_numbers) if line_numbers is not None else renamed


def _check_options(dataset_format: str, known: tuple[str, ...], on_bad_rows: str) -> None:
    if dataset_format != "auto" and dataset_format not in known:
        raise ConfigError(f"dataset_format {dataset_format!r} is not one of: auto, {', '.join(known)}")
    if on_bad_rows not in ON_BAD_ROWS:
        raise ConfigError(f"on_bad_rows {on_bad_rows!r} is not one of: {', '.join(ON_BAD_ROWS)}")


def _run_parser(rows, source_name: str, fmt: str, parse: Callable, on_bad_rows: str, deduplicate: bool = False):
    """Parse every row; collect problems; raise (on_bad_rows="error") or skip and record them; optionally drop exact
    duplicates of an earlier example (counted in `deduplicated`)."""
    line_numbers = getattr(rows, "line_numbers", None)
    report = DataReport(read=0, kept=0, skipped=0, format=fmt, source=source_name, line_numbers=line_numbers)
    examples, problems, n_problems, seen = [], [], 0, set()
    for index, row in enumerate(rows):
        report.read += 1
        try:
            if not isinstance(row, dict):
                raise RowProblem(None, f"expected a row object, got {json_type_name(row)}")
            example = parse(row, index)
        except RowProblem as p:
            at = where(source_name, line_numbers, index)
            message = f"{at}: field '{p.field}': {p.reason}" if p.field else f"{at}: {p.reason}"
            n_problems += 1
            if on_bad_rows == "skip":
                report.skipped_rows.append({"row": index, "reason": message})
            elif len(problems) < MAX_LISTED_PROBLEMS:
                problems.append(message)
            continue
        produced = example if isinstance(example, list) else [example]
        if not produced:
            report.unpaired += 1
        for ex in produced:
            if deduplicate:
                key = example_digest(ex)
                if key in seen:
                    report.deduplicated += 1
                    continue
                seen.add(key)
            examples.append(ex)
    if problems:
        more = f" (+{n_problems - 1} more)" if n_problems > 1 else ""
        err = DataError(problems[0] + more)
        err.problems = problems
        raise err
    report.skipped = len(report.skipped_rows)
    report.kept = len(examples)
    if report.read == 0:
        raise DataError(f"{source_name}: no rows")
    if not examples and report.skipped_rows:
        raise DataError(f"{source_name}: all {report.read} rows are malformed or unusable; first: {report.skipped_rows[0]['reason']}")
    if not examples:
        raise DataError(f"{source_name}: no usable rows ({report.unpaired} scored rows gave no pair: scores tied or closer "
                        "than min_score_gap, or a single distinct completion)")
    return examples, report


def preference_examples(rows, source_name: str, *, dataset_format: str = "auto", column_map: dict | None = None,
                        on_bad_rows: str = "error", chat_template_available: bool | None = None,
                        pair_strategy: str = "best_vs_worst", min_score_gap: float = 0.0, deduplicate: bool = False
                        ) -> tuple[list[PreferenceExample], DataReport]:
    """Validate `rows` as preference pairs; returns ``(examples, report)``.

    `dataset_format` is ``auto`` or one of `PREFERENCE_FORMATS`; `column_map` renames columns first. With
    ``chat_template_available=False`` conversational data is refused up front (it needs the tokenizer's chat
    template); None skips that check. `pair_strategy` / `min_score_gap` turn ``scored`` rows into pairs (module
    docstring). ``deduplicate=True`` keeps only the first of exactly-equal examples and counts the rest.
    Raises `DataError` for bad rows (``on_bad_rows="error"``) or when no row is left, `ConfigError` for an unknown
    option value.
    """
    _check_options(dataset_format, PREFERENCE_FORMATS, on_bad_rows)
    if pair_strategy not in PAIR_STRATEGIES:
        raise ConfigError(f"pair_strategy {pair_strategy!r} is not one of: {', '.join(PAIR_STRATEGIES)}")
    if isinstance(min_score_gap, bool) or not isinstance(min_score_gap, (int, float)) or not min_score_gap >= 0:
        raise ConfigError(f"min_score_gap must be a number >= 0, got {min_score_gap!r}")
    rows = _apply_column_map(rows, column_map, source_name)
    fmt = detect_preference_format(rows, source_name) if dataset_format == "auto" else dataset_format
    messages = fmt in ("conversational", "implicit_conversational")
    if messages or (fmt == "scored" and isinstance(_first_value(rows, "prompt"), list)):
        _needs_chat_template(chat_template_available, fmt, source_name)
    if fmt == "scored":
        def parse(row, index):
            return _scored(row, index, pair_strategy, float(min_score_gap))
    else:
        parse = _PREFERENCE_PARSERS[fmt]
    return _run_parser(rows, source_name, fmt, parse, on_bad_rows, deduplicate)


def _needs_chat_template(chat_template_available: bool | None, fmt: str, source_name: str) -> None:
    """Refuse message data up front when the tokenizer has no chat template: found while tokenizing, the same fact
    would surface as a row error after part of the work (or of a `data check` report) was done."""
    if chat_template_available is False:
        raise DataError(f"{source_name}: {fmt} data needs a chat template, but the tokenizer has none; "
                        "set chat_template (a Jinja string or file) or use text data")


def _prompt_only(row: dict, index: int) -> PromptExample:
    raw = row.get("prompt")
    if isinstance(raw, list):
        return PromptExample(fold_input(row, with_system(row, prompt_messages(message_list(raw, "prompt"), "prompt"))), index)
    return PromptExample(fold_input(row, text_value(row, "prompt")), index, optional_text(row, "system"))


_COMPLETION_COLUMNS = {"chosen", "rejected", "completions", "responses", "completion", "messages", "text"}


def prompt_examples(rows, source_name: str, *, column_map: dict | None = None, on_bad_rows: str = "error"
                    ) -> tuple[list[PromptExample], DataReport]:
    """The distinct prompts of `rows`; returns ``(prompts, report)``.

    Rows holding only prompts (a ``prompt`` column: text with optional ``system`` and ``input``, or a message list
    ending with a user turn) give one prompt each. Preference or SFT rows (any format above, e.g. HH transcripts)
    give the prompts of their examples, so a training file can be sampled from as it is. Each distinct prompt is
    kept once, at its first row; the repeats are counted in ``report.deduplicated``. Bad rows are handled as in
    `preference_examples`.
    """
    _check_options("auto", (), on_bad_rows)
    rows = _apply_column_map(rows, column_map, source_name)
    _not_empty(rows, source_name)
    cols = set(_columns(rows))
    if cols & _COMPLETION_COLUMNS:
        preference = bool(cols & {"chosen", "rejected", "completions", "responses"})
        if not preference and detect_sft_format(rows, source_name) == "text":
            raise DataError(f"{source_name}: 'text' rows hold no prompt to sample from; give a 'prompt' column")
        examples, report = (preference_examples if preference else sft_examples)(rows, source_name,
                                                                                on_bad_rows=on_bad_rows)
        prompts = [PromptExample(e.prompt, e.row, e.system) for e in examples]
    elif "prompt" in cols:
        prompts, report = _run_parser(rows, source_name, "prompts", _prompt_only, on_bad_rows)
    else:
        raise DataError(f"{source_name}: no 'prompt' column (columns: {', '.join(sorted(cols))}); rename one with "
                        "column_map, or give preference / SFT rows")
    seen, unique = set(), []
    for p in prompts:
        key = prompt_key(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    report.deduplicated += len(prompts) - len(unique)
    report.kept = len(unique)
    return unique, report


def sft_examples(rows, source_name: str, *, dataset_format: str = "auto", column_map: dict | None = None,
                 on_bad_rows: str = "error", deduplicate: bool = False, chat_template_available: bool | None = None
                 ) -> tuple[list[SFTExample], DataReport]:
    """Validate `rows` as SFT examples; returns ``(examples, report)``. Options as in `preference_examples`."""
    _check_options(dataset_format, SFT_FORMATS, on_bad_rows)
    rows = _apply_column_map(rows, column_map, source_name)
    fmt = detect_sft_format(rows, source_name) if dataset_format == "auto" else dataset_format
    if fmt in ("conversational_prompt_completion", "messages"):
        _needs_chat_template(chat_template_available, fmt, source_name)
    return _run_parser(rows, source_name, fmt, _SFT_PARSERS[fmt], on_bad_rows, deduplicate)
