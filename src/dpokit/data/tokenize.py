"""Canonical examples -> token ids: prompt ids, completion ids ending with EOS, then truncation.

Text examples. ``prompt_ids = tokenizer(prompt).input_ids`` (the tokenizer's own special tokens, so BOS exactly
once). The completion ids are the tokens the model must generate after ``prompt_ids`` to produce the completion
text: tokenize ``prompt + completion``; when those ids start with ``prompt_ids`` the completion is the rest. When
they do not (SentencePiece/BPE merged characters across the boundary, e.g. "Hello wor" + "ld"), the completion is
tokenized on its own behind a sentinel (``"\\n" + completion`` without special tokens, minus the sentinel's own
tokens, which is how SentencePiece's dummy leading space is kept off), and the split is accepted only if
``decode(prompt_ids + completion_ids)`` equals ``decode(ids of prompt + completion)``; if no sentinel gives a
consistent split the row is a `DataError`.

Conversational examples are rendered with the tokenizer's chat template: the prompt with
``add_generation_prompt=True``, the whole conversation (prompt + completion messages) without; the completion text is
the conversation's rendering minus the prompt's (which must be a prefix of it, else `DataError`). Both are then
tokenized exactly as text, but WITHOUT adding special tokens (the template already wrote BOS into the text).

Every completion ends with ``tokenizer.eos_token_id``, appended unless already there. A chat template that closes
the turn with EOS followed by more text (ChatML's ``"<|im_end|>\n"``) keeps its rendering as it is, as TRL trains it:
EOS is appended to a rendered completion only when it holds no EOS at all.

Truncation, in order (lengths in tokens):
1. ``max_prompt_length`` cuts the prompt from the left (keeps its end).
2. ``max_completion_length`` cuts each completion from the right.
3. ``max_length`` bounds prompt + completion. ``keep_start`` cuts completions from the right. ``keep_end`` first
   cuts the prompt from the left (keeping at least one token) until the longest completion fits, then completions
   from the right if still too long.
Left cuts keep a leading BOS: the prompt loses the tokens right after it (a Llama model without BOS is out of
distribution). A row in which any completion would lose all its tokens is dropped and counted
(`DataReport.dropped`), never returned: training on an empty completion teaches nothing and skews the loss. So is a
pair whose chosen and rejected ids are identical once truncated (they shared their first tokens and the cut kept only
those, or the template rendered two texts alike; `DataReport.identical_after_truncation`, part of `dropped`): its loss
has no gradient, yet it would count in the loss mean and the metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from dpokit.data.examples import DataReport, PreferenceExample, SFTExample
from dpokit.errors import ConfigError, DataError

TRUNCATION_MODES = ("keep_start", "keep_end")
# Texts placed before a completion to tokenize it "mid-text": their tokens never merge with what follows in the
# tokenizers we know ("\n" is a byte token in SentencePiece); the others are tried when "\n" does merge (BPE "\n\n").
_SENTINELS = ("\n", "a", "0", "#", "\u3002")
CHUNK_SIZE = 512  # examples tokenized together: big enough for batch speed, small enough to bound the temporaries


@dataclass
class TokenizedPair:
    """Token ids of one preference pair (int32 arrays). The model input is prompt_ids + chosen_ids (or rejected)."""

    prompt_ids: np.ndarray
    chosen_ids: np.ndarray
    rejected_ids: np.ndarray
    row: int


@dataclass
class TokenizedSFT:
    """Token ids of one SFT example (int32 arrays); the loss covers completion_ids."""

    prompt_ids: np.ndarray
    completion_ids: np.ndarray
    row: int


@dataclass(frozen=True)
class _Limits:
    max_length: int | None
    max_prompt_length: int | None
    max_completion_length: int | None
    truncation_mode: str

    def __post_init__(self):
        for name in ("max_length", "max_prompt_length", "max_completion_length"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer or None, got {value!r}")
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ConfigError(f"truncation_mode {self.truncation_mode!r} is not one of: {', '.join(TRUNCATION_MODES)}")


@dataclass
class _Rendered:
    """An example as text: prompt text, completion texts, and whether tokenizing must add special tokens."""

    prompt: str
    completions: list[str]
    add_special_tokens: bool


def _tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


class _Encoder:
    """Batch tokenization and the prompt/completion split for one tokenizer."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise DataError(f"tokenizer {_tokenizer_name(tokenizer)!r} has no eos_token; set one "
                            f"(dpokit ends every completion with it)")
        self.bos = tokenizer.bos_token_id
        with_special = tokenizer("a").input_ids
        without = tokenizer("a", add_special_tokens=False).input_ids
        if with_special[len(with_special) - len(without):] != without:
            # e.g. add_eos_token=True: every prompt would end with EOS. dpokit places EOS itself.
            raise DataError(f"tokenizer {_tokenizer_name(tokenizer)!r} appends special tokens to every text "
                            f"({with_special} for 'a'); load it without add_eos_token")
        self._sentinel_ids = {s: tokenizer(s, add_special_tokens=False).input_ids for s in _SENTINELS}

    def encode(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        if not texts:
            return []
        # verbose=False: long transcripts exceed model_max_length; truncation is ours, so the warning is noise.
        return self.tok(texts, add_special_tokens=add_special_tokens, verbose=False, return_attention_mask=False,
                        return_token_type_ids=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def completion_ids(self, prompt_texts: list[str], prompt_ids: list[list[int]], completion_texts: list[str],
                       add_special_tokens: bool, wheres: list[str]) -> list[list[int]]:
        """Ids the model generates after each prompt to write each completion, EOS-terminated."""
        fulls = self.encode([p + c for p, c in zip(prompt_texts, completion_texts)], add_special_tokens)
        out = []
        for p_ids, c_text, full, where in zip(prompt_ids, completion_texts, fulls, wheres):
            n = len(p_ids)
            ids = full[n:] if full[:n] == p_ids else self._standalone(p_ids, c_text, full, where)
            if not ids:
                raise DataError(f"{where}: the completion adds no tokens after the prompt")
            # A chat template that closes the turn with EOS keeps its own ending (e.g. "<|im_end|>\n"), as TRL
            # trains it: a second EOS after the newline would be a sequence the model never sees at inference.
            if ids[-1] != self.eos and (add_special_tokens or self.eos not in ids):
                ids = ids + [self.eos]
            out.append(ids)
        return out

    def _standalone(self, p_ids: list[int], c_text: str, full: list[int], where: str) -> list[int]:
        """Completion ids for a boundary where prompt+completion tokenizes across the join."""
        target = self.decode(full)
        for sentinel, s_ids in self._sentinel_ids.items():
            ids = self.tok(sentinel + c_text, add_special_tokens=False, verbose=False).input_ids
            if ids[: len(s_ids)] != s_ids:
                continue  # the sentinel merged with the completion's first characters; try the next one
            candidate = ids[len(s_ids):]
            if self.decode(p_ids + candidate) == target:
                return candidate
        raise DataError(f"{where}: no split of prompt+completion into prompt tokens then completion tokens decodes "
                        f"back to the text (tokenizer {_tokenizer_name(self.tok)!r})")


def model_prompt(prompt, system: str | None, tokenizer):
    """A prompt as the model is given it: a message list, or a text alone, as it is; a text with a system prompt as
    the conversation ``[system, user]`` when the tokenizer has a chat template (the system prompt then sits where
    the model was tuned to read one, as in a conversational row with a system message), else as
    ``system + "\\n\\n" + prompt``. Training renders such a row's completions as the assistant's turn
    (`tokenize_preference`, `tokenize_sft`); sampling and judges see the same prompt."""
    if system is None:
        return prompt
    if isinstance(prompt, list):
        return [{"role": "system", "content": system}] + prompt
    if getattr(tokenizer, "chat_template", None):
        return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    return f"{system}\n\n{prompt}"


def _render(prompt, completions: Sequence, system: str | None, tokenizer, where: str, fields: Sequence[str]) -> _Rendered:
    if system is not None:
        text_row = isinstance(prompt, str) and all(isinstance(c, str) for c in completions)
        prompt = model_prompt(prompt, system, tokenizer)
        if text_row and isinstance(prompt, list):  # a text row with a system prompt, rendered as a conversation
            completions = [[{"role": "assistant", "content": c}] for c in completions]
    if isinstance(prompt, str) and all(isinstance(c, str) for c in completions):
        return _Rendered(prompt, list(completions), add_special_tokens=True)
    if not (isinstance(prompt, list) and all(isinstance(c, list) for c in completions)):
        raise DataError(f"{where}: prompt and completions must be all strings or all message lists")
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{where}: conversational row, but tokenizer {_tokenizer_name(tokenizer)!r} has no chat "
                        f"template; set chat_template (a Jinja string or file)")
    try:
        prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        fulls = [tokenizer.apply_chat_template(prompt + c, tokenize=False) for c in completions]
    except Exception as e:  # jinja's raise_exception and template bugs surface as assorted types
        raise DataError(f"{where}: the chat template failed on this row ({' '.join(str(e).split())})") from None
    texts = []
    for full, name in zip(fulls, fields):
        if not full.startswith(prompt_text):
            raise DataError(f"{where}: field '{name}': the chat template renders prompt+{name} so that it does not "
                            f"start with the rendered prompt (add_generation_prompt=True); cannot locate the completion")
        texts.append(full[len(prompt_text):])
        if not texts[-1]:
            raise DataError(f"{where}: field '{name}': the chat template renders the completion as empty text")
    return _Rendered(prompt_text, texts, add_special_tokens=False)


def prompt_ids(prompt, tokenizer, system: str | None = None, where: str = "prompt") -> list[int]:
    """Token ids of a prompt alone, exactly as training gives them to the model: a text (with `system` folded in)
    tokenized with the tokenizer's special tokens, or a message list rendered by the chat template with the
    generation prompt and tokenized without adding special tokens (the template writes them)."""
    rendered = _render(prompt, [], system, tokenizer, where, ())
    return tokenizer(rendered.prompt, add_special_tokens=rendered.add_special_tokens, verbose=False).input_ids


def _tokenize_rendered(encoder: _Encoder, rendered: list[_Rendered], wheres: list[str], fields: Sequence[str]
                       ) -> list[tuple[list[int], list[list[int]]]]:
    """(prompt ids, [completion ids per field]) for every rendered example, tokenizing in batches."""
    result: list = [None] * len(rendered)
    for add_special in (True, False):
        idx = [i for i, r in enumerate(rendered) if r.add_special_tokens == add_special]
        if not idx:
            continue
        prompts = [rendered[i].prompt for i in idx]
        prompt_ids = encoder.encode(prompts, add_special)
        per_field = [
            encoder.completion_ids(prompts, prompt_ids, [rendered[i].completions[k] for i in idx], add_special,
                                   [f"{wheres[i]}: field '{name}'" for i in idx])
            for k, name in enumerate(fields)
        ]
        for j, i in enumerate(idx):
            result[i] = (prompt_ids[j], [comp[j] for comp in per_field])
    return result


def _cut_left(ids: list[int], keep: int, bos: int | None) -> list[int]:
    """The last `keep` tokens of `ids`, except that a leading BOS stays (it then counts as one of the `keep`)."""
    if bos is not None and ids and ids[0] == bos and keep >= 1:
        return ids[:1] + (ids[len(ids) - (keep - 1):] if keep > 1 else [])
    return ids[len(ids) - keep:]


def _truncate(prompt: list[int], completions: list[list[int]], limits: _Limits, bos: int | None):
    """Apply the truncation rules (module docstring); returns (prompt, completions, prompt_cut, completion_cut) or
    None when a completion would lose every token."""
    prompt_cut = completion_cut = False
    if limits.max_prompt_length is not None and len(prompt) > limits.max_prompt_length:
        prompt, prompt_cut = _cut_left(prompt, limits.max_prompt_length, bos), True
    if limits.max_completion_length is not None:
        cut = [c[: limits.max_completion_length] for c in completions]
        completion_cut = any(len(a) != len(b) for a, b in zip(cut, completions))
        completions = cut
    if limits.max_length is not None:
        longest = max(len(c) for c in completions)
        if limits.truncation_mode == "keep_end" and len(prompt) + longest > limits.max_length:
            room = max(1, limits.max_length - longest)
            if len(prompt) > room:
                prompt, prompt_cut = _cut_left(prompt, room, bos), True
        budget = limits.max_length - len(prompt)
        if budget <= 0:
            return None
        cut = [c[:budget] for c in completions]
        completion_cut = completion_cut or any(len(a) != len(b) for a, b in zip(cut, completions))
        completions = cut
    return prompt, completions, prompt_cut, completion_cut


def _as_int32_views(items: list[tuple[int, list[list[int]]]]) -> list[tuple[int, np.ndarray, list[np.ndarray]]]:
    """(row, [prompt ids, *completion ids]) -> (row, prompt array, [completion arrays]), every array an int32 view
    into ONE buffer for the whole chunk. Thousands of small arrays, each malloc'ed between the tokenizer's short-lived
    buffers, would fragment the heap: measured, that cost ~1.5x their size in resident memory on top."""
    lengths = [len(ids) for _, seqs in items for ids in seqs]
    flat = np.fromiter((t for _, seqs in items for ids in seqs for t in ids), np.int32, count=sum(lengths))
    ends = np.cumsum(lengths).tolist()
    out, k = [], 0
    for row, seqs in items:
        views = [flat[(ends[k + j - 1] if k + j else 0): ends[k + j]] for j in range(len(seqs))]
        k += len(seqs)
        out.append((row, views[0], views[1:]))
    return out


def _identical(completions: Sequence[Sequence[int]]) -> bool:
    """Chosen and rejected with the same ids (e.g. cut to a shared start by max_completion_length): the DPO loss of
    such a pair has no gradient, yet it would count in the loss mean and the reward metrics as a pair."""
    return len(completions) == 2 and list(completions[0]) == list(completions[1])


@dataclass
class _Counts:
    """What `_tokenize` cut and dropped: rows losing a whole completion, rows with chosen == rejected once cut, kept
    rows with the prompt / a completion cut."""

    lost: int = 0
    identical: int = 0
    prompt_cut: int = 0
    completion_cut: int = 0


def _tokenize(examples, tokenizer, limits: _Limits | None, where: Callable[[int], str], get_parts: Callable, fields
              ) -> tuple[list[tuple[int, np.ndarray, list[np.ndarray]]], _Counts]:
    """Shared driver: render, tokenize, truncate, drop. Returns (row, prompt ids, completion ids) for kept rows and the
    counts. With ``limits=None`` nothing is cut or dropped: every example comes back, in order."""
    encoder = _Encoder(tokenizer)
    kept, counts = [], _Counts()
    # One chunk at a time: the rendered texts, the prompt+completion concatenations and the tokenizer's output (Python
    # int lists plus, for fast tokenizers, an Encoding object per text: ~50x the int32 size) exist for CHUNK_SIZE
    # examples only; what is kept is int32.
    for start in range(0, len(examples), CHUNK_SIZE):
        chunk = examples[start:start + CHUNK_SIZE]
        wheres = [where(ex.row) for ex in chunk]
        rendered = [_render(*get_parts(ex), ex.system, tokenizer, w, fields) for ex, w in zip(chunk, wheres)]
        chunk_kept = []
        for ex, (prompt, completions) in zip(chunk, _tokenize_rendered(encoder, rendered, wheres, fields)):
            if limits is not None:
                cut = _truncate(prompt, completions, limits, encoder.bos)
                if cut is None:
                    counts.lost += 1
                    continue
                prompt, completions, prompt_cut, completion_cut = cut
                if _identical(completions):
                    counts.identical += 1
                    continue
                counts.prompt_cut += prompt_cut
                counts.completion_cut += completion_cut
            chunk_kept.append((ex.row, [prompt, *completions]))
        kept.extend(_as_int32_views(chunk_kept))
    return kept, counts


def _plain_where(row: int) -> str:
    return f"row {row + 1}"


def _tokenize_counted(examples, tokenizer, limits: _Limits, report: DataReport | None, get_parts: Callable, fields):
    """`_tokenize` with the counts added to `report` (which also names rows in errors); no row left is an error."""
    kept, counts = _tokenize(examples, tokenizer, limits, report.where if report is not None else _plain_where,
                             get_parts, fields)
    if report is not None:
        report.dropped += counts.lost + counts.identical
        report.identical_after_truncation += counts.identical
        report.kept -= counts.lost + counts.identical
        report.truncated_prompt += counts.prompt_cut
        report.truncated_completion += counts.completion_cut
    if examples and not kept:
        source = report.source if report is not None else "data"
        why = ("every one would lose a whole completion" if not counts.identical else
               f"{counts.lost} would lose a whole completion, {counts.identical} would have chosen identical to rejected")
        raise DataError(f"{source}: all {len(examples)} rows were dropped by truncation (max_length={limits.max_length}, "
                        f"max_prompt_length={limits.max_prompt_length}"
                        + (f", max_completion_length={limits.max_completion_length}" if limits.max_completion_length else "")
                        + f"): {why}")
    return kept


def _parts_of(example) -> tuple:
    """(prompt, [completions]) of a preference pair (chosen, rejected) or an SFT example (its completion)."""
    if isinstance(example, PreferenceExample):
        return example.prompt, [example.chosen, example.rejected]
    return example.prompt, [example.completion]


def token_ids(examples: Sequence[PreferenceExample] | Sequence[SFTExample], tokenizer, *,
              report: DataReport | None = None) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """(prompt ids, [completion ids]) of EVERY example, in order, untruncated, none dropped: what ``dpokit data
    check`` / ``filter`` try length limits on (with `_truncate` and `_identical`). Preference pairs give [chosen,
    rejected], SFT examples [completion]. `report` only names rows in errors; it is not changed."""
    sft = bool(examples) and isinstance(examples[0], SFTExample)
    fields = ("completion",) if sft else ("chosen", "rejected")
    kept, _ = _tokenize(examples, tokenizer, None, report.where if report is not None else _plain_where, _parts_of,
                        fields)
    return [(p, c) for _, p, c in kept]


def tokenize_preference(examples: Sequence[PreferenceExample], tokenizer, *, max_length: int | None = None,
                        max_prompt_length: int | None = None, max_completion_length: int | None = None,
                        truncation_mode: str = "keep_start", report: DataReport | None = None) -> list[TokenizedPair]:
    """Tokenize and truncate preference pairs (rules in the module docstring); dropped pairs are not returned.

    `report` (from `preference_examples`) names rows in errors and is updated in place: dropped (with
    identical_after_truncation), kept, truncated_prompt, truncated_completion (call once per report).
    """
    limits = _Limits(max_length, max_prompt_length, max_completion_length, truncation_mode)
    kept = _tokenize_counted(examples, tokenizer, limits, report, _parts_of, ("chosen", "rejected"))
    return [TokenizedPair(p, c[0], c[1], row) for row, p, c in kept]


def tokenize_sft(examples: Sequence[SFTExample], tokenizer, *, max_length: int | None = None,
                 truncation_mode: str = "keep_start", report: DataReport | None = None) -> list[TokenizedSFT]:
    """Tokenize and truncate SFT examples (rules in the module docstring); dropped examples are not returned.

    A `text` example (empty prompt) gets ``prompt_ids = tokenizer("").input_ids`` (just BOS, or nothing) and every
    other token of the text as completion.
    """
    limits = _Limits(max_length, None, None, truncation_mode)
    kept = _tokenize_counted(examples, tokenizer, limits, report, _parts_of, ("completion",))
    return [TokenizedSFT(p, c[0], row) for row, p, c in kept]
