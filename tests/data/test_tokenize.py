"""Tokenization: the prompt/completion boundary, EOS, chat templates and truncation (dpokit.data.tokenize)."""

from __future__ import annotations

import numpy as np
import pytest

from dpokit.data import (
    DataReport,
    PreferenceExample,
    SFTExample,
    parse_hh_transcript,
    preference_examples,
    sft_examples,
    tokenize_preference,
    tokenize_sft,
)
from dpokit.errors import ConfigError, DataError

from .conftest import CHATML_TEMPLATE, HH_TEMPLATE, INST_TEMPLATE, LLAMA2

BOS, EOS = 1, 2


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def pair(prompt, chosen, rejected="zzz", row=0):
    return PreferenceExample(prompt, chosen, rejected, row)


def ids(a) -> list[int]:
    return [int(x) for x in a]


# ------------------------------------------------------------------------------------------- the boundary


@pytest.mark.parametrize("prompt, completion", [
    ("Hello wor", "ld"),            # SentencePiece merges across the join: "▁world" is one token
    ("Hello", " world"),            # leading space belongs to the completion's first token
    ("Hello", "\nworld"),           # completion starting with a newline
    ("Hello", "\n\n  indented"),
    ("Hello ", "world"),            # trailing space in the prompt
    ("Question:", " "),             # a reply that is a single space (HH's "say nothing")
    ("Hello", "  two spaces"),
    ("日本", "語です"),
])
def test_completion_ids_continue_the_prompt_ids_exactly(llama2, prompt, completion):
    (p,) = tokenize_preference([pair(prompt, completion)], llama2)
    assert p.prompt_ids.dtype == np.int32 and p.chosen_ids.dtype == np.int32
    assert ids(p.prompt_ids) == llama2(prompt).input_ids  # exactly the tokenizer's own prompt encoding
    assert ids(p.chosen_ids)[-1] == EOS and EOS not in ids(p.chosen_ids)[:-1]
    assert ids(p.prompt_ids).count(BOS) == 1 and BOS not in ids(p.chosen_ids)
    text = llama2.decode(ids(p.prompt_ids) + ids(p.chosen_ids)[:-1], skip_special_tokens=True)
    assert text == llama2.decode(llama2(prompt + completion).input_ids, skip_special_tokens=True)
    assert text == prompt + completion


def test_merge_across_the_boundary_uses_the_standalone_completion(llama2):
    (p,) = tokenize_preference([pair("Hello wor", "ld")], llama2)
    assert llama2(["Hello wor" + "ld"]).input_ids[0][:3] != ids(p.prompt_ids)  # the merge really happens
    assert llama2.convert_ids_to_tokens(ids(p.chosen_ids)) == ["ld", "</s>"]    # no dummy "▁" before "ld"


def test_eos_is_not_doubled_and_is_required(llama2):
    (p,) = tokenize_preference([pair("x", "y</s>")], llama2)
    assert ids(p.chosen_ids) == [29891, EOS]
    from transformers import AutoTokenizer

    no_eos = AutoTokenizer.from_pretrained(LLAMA2)
    no_eos.eos_token = None
    with pytest.raises(DataError, match=r"has no eos_token; set one"):
        tokenize_preference([pair("x", "y")], no_eos)
    appends = AutoTokenizer.from_pretrained(LLAMA2, add_eos_token=True)
    with pytest.raises(DataError, match=r"appends special tokens to every text .*; load it without add_eos_token"):
        tokenize_preference([pair("x", "y")], appends)


def test_system_column_is_prepended_to_text_prompts(llama2):
    ex = PreferenceExample("Q?", " A", " B", 0, system="Be brief.")
    (p,) = tokenize_preference([ex], llama2)
    assert ids(p.prompt_ids) == llama2("Be brief.\n\nQ?").input_ids


class PairTokenizer:
    """A toy tokenizer that cuts text into two-character tokens from its start: nothing can be split mid-text."""

    eos_token_id, bos_token_id, name_or_path, chat_template = 0, None, "pairs", None

    def __init__(self):
        self.vocab = {"</s>": 0}

    def _encode(self, text):
        return [self.vocab.setdefault(text[i:i + 2], len(self.vocab)) for i in range(0, len(text), 2)]

    def __call__(self, text, add_special_tokens=True, verbose=True, return_attention_mask=None,
                 return_token_type_ids=None):  # the keywords of a transformers tokenizer that dpokit passes
        class Out(dict):
            input_ids = property(lambda self: self["input_ids"])

        return Out(input_ids=[self._encode(t) for t in text] if isinstance(text, list) else self._encode(text))

    def decode(self, token_ids, skip_special_tokens=False):
        inverse = {v: k for k, v in self.vocab.items()}
        return "".join(inverse[i] for i in token_ids if not (skip_special_tokens and i == 0))


def test_no_consistent_split_is_an_error():
    (p,) = tokenize_preference([pair("abcd", "ef", "gh")], PairTokenizer())  # even boundary: fine
    assert len(p.prompt_ids) == 2 and len(p.chosen_ids) == 2
    with pytest.raises(DataError, match=r"^row 1: field 'chosen': no split of prompt\+completion into prompt tokens "
                                        r"then completion tokens decodes back to the text \(tokenizer 'pairs'\)$"):
        tokenize_preference([pair("abc", "de", "fg")], PairTokenizer())


def test_whole_hh_file_decodes_back_exactly(llama2, hh_rows):
    examples, report = preference_examples(*hh_rows)
    pairs = tokenize_preference(examples, llama2, report=report)
    assert len(pairs) == 2312 and [p.row for p in pairs] == list(range(2312))
    for ex, p in zip(examples, pairs):
        assert ids(p.prompt_ids)[:2] == [BOS, 29871] and ids(p.prompt_ids).count(BOS) == 1
        for text, comp in ((ex.chosen, p.chosen_ids), (ex.rejected, p.rejected_ids)):
            assert comp[-1] == EOS
            assert llama2.decode(ids(p.prompt_ids) + ids(comp[:-1]), skip_special_tokens=True) == ex.prompt + text
    assert (report.dropped, report.truncated_prompt, report.truncated_completion) == (0, 0, 0)


# ------------------------------------------------------------------------------------------- chat templates


def test_a_text_rows_system_prompt_goes_through_the_chat_template(llama2_chat):
    """With a chat template, a text row's `system` is a system message: the row is tokenized as the conversation
    [system, user: prompt] + [assistant: completion], not as plain "system\n\nprompt" text; sampling (`prompt_ids`)
    and the prompts of `dpokit eval` / `dpokit pairs` (`PromptExample.for_model`) see the same tokens."""
    from dpokit.data import PromptExample
    from dpokit.data.tokenize import prompt_ids

    llama2_chat.chat_template = INST_TEMPLATE
    text = PreferenceExample("Q?", "A", "B", 0, system="Be brief.")
    conversation = PreferenceExample([{"role": "system", "content": "Be brief."}, user("Q?")], [assistant("A")],
                                     [assistant("B")], 0)
    (got,), (want,) = tokenize_preference([text], llama2_chat), tokenize_preference([conversation], llama2_chat)
    assert ids(got.prompt_ids) == ids(want.prompt_ids) == \
        llama2_chat("<s><<SYS>>Be brief.<</SYS>>[INST] Q? [/INST]", add_special_tokens=False).input_ids
    assert ids(got.chosen_ids) == ids(want.chosen_ids) and ids(got.rejected_ids) == ids(want.rejected_ids)
    (sft,) = tokenize_sft([SFTExample("Q?", "A", 0, system="Be brief.")], llama2_chat)
    assert ids(sft.prompt_ids) == ids(want.prompt_ids)
    prompt = PromptExample("Q?", 0, "Be brief.").for_model(llama2_chat)
    assert prompt == conversation.prompt and prompt_ids(prompt, llama2_chat) == ids(want.prompt_ids)
    # A row without a system prompt stays text, as TRL tokenizes a standard row.
    (plain,) = tokenize_preference([PreferenceExample("Q?", " A", " B", 0)], llama2_chat)
    assert ids(plain.prompt_ids) == llama2_chat("Q?").input_ids


def test_conversational_uses_the_template_and_no_second_bos(llama2_chat):
    llama2_chat.chat_template = INST_TEMPLATE
    ex = PreferenceExample([{"role": "system", "content": "S"}, user("hi")], [assistant("Hello!")], [assistant("Go.")], 0)
    (p,) = tokenize_preference([ex], llama2_chat)
    prompt_text = "<s><<SYS>>S<</SYS>>[INST] hi [/INST]"
    assert ids(p.prompt_ids) == llama2_chat(prompt_text, add_special_tokens=False).input_ids
    assert ids(p.prompt_ids).count(BOS) == 1
    # the template closes the turn with EOS: it is not added a second time
    assert ids(p.chosen_ids)[-1] == EOS and ids(p.chosen_ids).count(EOS) == 1
    assert llama2_chat.decode(ids(p.chosen_ids)) == "Hello!</s>"


def test_conversational_eos_is_appended_when_the_template_does_not_end_with_it(llama2_chat):
    llama2_chat.chat_template = CHATML_TEMPLATE
    ex = SFTExample([user("hi")], [assistant("yo")], 3)
    (s,) = tokenize_sft([ex], llama2_chat)
    assert llama2_chat.decode(ids(s.prompt_ids)) == "<|user|>\nhi\n<|assistant|>\n"
    assert llama2_chat.decode(ids(s.completion_ids)) == "yo\n</s>"
    assert s.row == 3


def test_a_template_closing_the_turn_with_eos_then_text_keeps_its_rendering(llama2_chat):
    """ChatML-style "<eos>\n" after a turn: the completion is the rendering as it is, as TRL trains it; a second EOS
    after the newline would train a sequence the model never meets when it generates."""
    llama2_chat.chat_template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}"
                                 "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
    ex = SFTExample([user("hi")], [assistant("yo")], 0)
    (s,) = tokenize_sft([ex], llama2_chat)
    assert llama2_chat.decode(ids(s.completion_ids)) == "yo</s>\n"
    assert ids(s.completion_ids).count(EOS) == 1 and ids(s.completion_ids)[-1] != EOS


def test_conversational_errors(llama2, llama2_chat):
    ex = PreferenceExample([user("hi")], [assistant("a")], [assistant("b")], 4)
    report = DataReport(read=5, kept=5, skipped=0, source="t.jsonl", line_numbers=[1, 2, 3, 4, 9])
    with pytest.raises(DataError, match=r"^t\.jsonl:9: conversational row, but tokenizer '.*llama2' has no chat "
                                        r"template; set chat_template \(a Jinja string or file\)$"):
        tokenize_preference([ex], llama2, report=report)
    # a template that renders the prompt differently once a reply follows: no prefix, no split
    llama2_chat.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>>{% endif %}"
    with pytest.raises(DataError, match=r"^row 5: field 'chosen': the chat template renders prompt\+chosen so that it "
                                        r"does not start with the rendered prompt"):
        tokenize_preference([ex], llama2_chat)
    llama2_chat.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(DataError, match=r"^row 5: the chat template failed on this row \(roles must alternate\)$"):
        tokenize_preference([ex], llama2_chat)


def test_hh_as_messages_through_a_template_matches_hh_as_text(llama2, llama2_chat, hh_rows):
    """Same data two ways: raw text, and parsed messages rendered by an HH-layout template."""
    llama2_chat.chat_template = HH_TEMPLATE
    text_examples, _ = preference_examples(*hh_rows)
    conv_rows = [{"chosen": parse_hh_transcript(ex.prompt + ex.chosen),
                  "rejected": parse_hh_transcript(ex.prompt + ex.rejected)} for ex in text_examples[:400]]
    conv_examples, report = preference_examples(conv_rows, "<list>", on_bad_rows="skip")
    # an empty reply is an empty string in message form; in text form it is the " " after the marker
    assert [s["row"] for s in report.skipped_rows] == [86]
    by_text = tokenize_preference([text_examples[ex.row] for ex in conv_examples], llama2)
    by_template = tokenize_preference(conv_examples, llama2_chat)
    for a, b in zip(by_text, by_template):
        # "<s>" written by the template is followed by no SentencePiece dummy space ("▁", 29871); otherwise equal
        assert ids(a.prompt_ids) == [BOS, 29871] + ids(b.prompt_ids)[1:]
        assert ids(a.chosen_ids) == ids(b.chosen_ids) and ids(a.rejected_ids) == ids(b.rejected_ids)


# ------------------------------------------------------------------------------------------- truncation


def _lengths(p):
    return len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)


def _report(n):
    return DataReport(read=n, kept=n, skipped=0, source="<list>")


PROMPT = "one two three four five six seven eight nine ten"  # BOS + 10 tokens
LONG, SHORT = " a b c d e f g h", " yes"                   # 8 + EOS, 1 + EOS


def test_token_counts_used_below(llama2):
    (p,) = tokenize_preference([pair(PROMPT, LONG, SHORT)], llama2)
    assert _lengths(p) == (11, 9, 2)


def test_max_prompt_length_keeps_bos_and_the_prompt_end(llama2):
    report = _report(1)
    (p,) = tokenize_preference([pair(PROMPT, LONG, SHORT)], llama2, max_prompt_length=4, report=report)
    assert llama2.decode(ids(p.prompt_ids)) == "<s> eight nine ten"
    assert _lengths(p) == (4, 9, 2) and (report.truncated_prompt, report.truncated_completion) == (1, 0)


def test_max_completion_length_cuts_each_completion_from_the_right(llama2):
    report = _report(1)
    (p,) = tokenize_preference([pair(PROMPT, LONG, SHORT)], llama2, max_completion_length=3, report=report)
    assert llama2.decode(ids(p.chosen_ids)) == "a b c" and _lengths(p) == (11, 3, 2)
    assert (report.truncated_prompt, report.truncated_completion) == (0, 1)


def test_max_length_keep_start_cuts_completion_tails(llama2):
    report = _report(1)
    (p,) = tokenize_preference([pair(PROMPT, LONG, SHORT)], llama2, max_length=14, report=report)
    assert _lengths(p) == (11, 3, 2) and EOS not in ids(p.chosen_ids)
    assert (report.truncated_prompt, report.truncated_completion, report.kept) == (0, 1, 1)


def test_max_length_keep_end_cuts_the_prompt_start_first(llama2):
    report = _report(1)
    (p,) = tokenize_preference([pair(PROMPT, LONG, SHORT)], llama2, max_length=14, truncation_mode="keep_end", report=report)
    assert _lengths(p) == (5, 9, 2)
    assert llama2.decode(ids(p.prompt_ids)) == "<s> seven eight nine ten"
    assert (report.truncated_prompt, report.truncated_completion) == (1, 0)
    # keep at least one prompt token (here BOS), then cut the completion
    (p,) = tokenize_preference([pair(PROMPT, LONG, SHORT)], llama2, max_length=6, truncation_mode="keep_end")
    assert ids(p.prompt_ids) == [BOS] and _lengths(p) == (1, 5, 2)


def test_rows_that_would_lose_a_whole_completion_are_dropped_and_counted(llama2):
    examples = [pair(PROMPT, LONG, SHORT, row=0), pair("short", LONG, SHORT, row=1)]
    report = _report(2)
    pairs = tokenize_preference(examples, llama2, max_length=10, report=report)
    assert [p.row for p in pairs] == [1]
    assert (report.dropped, report.kept, report.truncated_completion) == (1, 1, 1)
    assert "1 dropped by truncation" in report.summary()
    with pytest.raises(DataError, match=r"^<list>: all 2 rows were dropped by truncation \(max_length=2"):
        tokenize_preference(examples, llama2, max_length=2, report=_report(2))


def test_bad_settings_are_config_errors(llama2):
    for kwargs, message in [({"max_length": 0}, "max_length must be a positive integer or None, got 0"),
                            ({"max_prompt_length": 2.5}, "max_prompt_length must be a positive integer"),
                            ({"truncation_mode": "keep_middle"}, "truncation_mode 'keep_middle' is not one of")]:
        with pytest.raises(ConfigError, match=message):
            tokenize_preference([pair("a", "b")], llama2, **kwargs)


# ------------------------------------------------------------------------------------------- SFT


def test_sft_text_row_trains_on_everything_but_bos(llama2):
    (ex,), report = sft_examples([{"text": "The whole document."}], "<list>")
    (s,) = tokenize_sft([ex], llama2, report=report)
    assert ids(s.prompt_ids) == [BOS]
    assert ids(s.prompt_ids) + ids(s.completion_ids) == llama2("The whole document.").input_ids + [EOS]


def test_sft_truncation_and_drop(llama2):
    examples = [SFTExample(PROMPT, LONG, 0), SFTExample("", "tiny", 1)]
    report = _report(2)
    out = tokenize_sft(examples, llama2, max_length=12, report=report)
    assert [(len(s.prompt_ids), len(s.completion_ids), s.row) for s in out] == [(11, 1, 0), (1, 2, 1)]
    assert report.truncated_completion == 1
    out = tokenize_sft(examples, llama2, max_length=11, report=report)
    assert [s.row for s in out] == [1] and report.dropped == 1
    out = tokenize_sft(examples, llama2, max_length=4, truncation_mode="keep_end")
    assert [(len(s.prompt_ids), len(s.completion_ids)) for s in out] == [(1, 3), (1, 2)]


def test_pairs_identical_after_truncation_are_dropped_and_counted(llama2):
    # chosen and rejected share their first four tokens; max_completion_length=4 keeps only those: a pair with no
    # gradient that would still count in the loss and the metrics.
    same_start = pair(PROMPT, " a b c d e", " a b c d x", row=0)
    examples = [same_start, pair(PROMPT, LONG, SHORT, row=1)]
    report = _report(2)
    pairs = tokenize_preference(examples, llama2, max_completion_length=4, report=report)
    assert [p.row for p in pairs] == [1]
    assert (report.dropped, report.identical_after_truncation, report.kept) == (1, 1, 1)
    assert "1 dropped by truncation (1 of them with chosen identical to rejected once tokenized and cut)" in report.summary()
    # Uncut, or cut where they still differ, the pair stays.
    assert len(tokenize_preference([same_start], llama2)) == 1
    assert len(tokenize_preference([same_start], llama2, max_completion_length=5)) == 1
    with pytest.raises(DataError, match=r"^<list>: all 1 rows were dropped by truncation \(max_length=None, "
                                        r"max_prompt_length=None, max_completion_length=4\): 0 would lose a whole "
                                        r"completion, 1 would have chosen identical to rejected$"):
        tokenize_preference([same_start], llama2, max_completion_length=4, report=_report(1))
