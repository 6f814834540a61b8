"""`dpokit data` commands (check, convert, filter, split), scored/input formats, and round-trip properties."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpokit.data import load_rows, preference_examples, sft_examples
from dpokit.data.formats import scored_pairs
from dpokit.data.tools import canonical_row, check_main, convert_main, filter_main, split_main, write_jsonl
from dpokit.errors import ConfigError, DataError

from .conftest import HH_FILE, LLAMA2

BAD = Path(__file__).parent / "fixtures" / "bad"

# file -> the one line check_main prints after "error: " ({p} is the path as given)
ROW = "{p}: all 1 rows are malformed or unusable; first: {p}:1: "
BAD_FILES = {
    "invalid_json.jsonl": "{p}:2: invalid JSON (Expecting value at column 12)",
    "not_an_object.jsonl": "{p}:1: expected a JSON object, got list",
    "invalid_utf8.jsonl": "{p}:1: invalid UTF-8 (byte 0xe9 at column 16)",
    "truncated_gzip.jsonl.gz": "{p}: cannot read gzip file (Compressed file ended before the end-of-stream marker was reached)",
    "not_gzip.jsonl.gz": "{p}: cannot read gzip file (Not a gzipped file (b'{\"'))",
    "empty.jsonl": "{p}: no rows",
    "unknown_columns.jsonl": "{p}: cannot detect a preference format from columns [answer, question]; expected "
                             "prompt+chosen+rejected, chosen+rejected, prompt+completions or prompt+responses+scores (rename columns with column_map)",
    "empty_chosen.jsonl": ROW + "field 'chosen': empty string",
    "null_rejected.jsonl": ROW + "field 'rejected': missing",
    "chosen_not_string.jsonl": ROW + "field 'chosen': expected a string, got integer",
    "chosen_equals_rejected.jsonl": ROW + "field 'rejected': identical to 'chosen'",
    "lone_surrogate.jsonl": ROW + "field 'chosen': invalid Unicode (lone surrogate U+D800 at character 2)",
    "unknown_role.jsonl": ROW + "field 'prompt[0].role': unknown role 'bot' (expected system, user, assistant, tool)",
    "system_not_first.jsonl": ROW + "field 'prompt[1].role': a system message must come first",
    "prompt_ends_with_assistant.jsonl": ROW + "field 'prompt[1].role': the prompt must end with a user (or tool) message, got 'assistant'",
    "chosen_user_role.jsonl": ROW + "field 'chosen[0].role': expected 'assistant', got 'user'",
    "content_not_string.jsonl": ROW + "field 'prompt[0].content[0]': expected a text part {\"type\": \"text\", \"text\": ...}, got string",
    "content_image_part.jsonl": ROW + "field 'prompt[0].content[1]': image parts are not supported: dpokit trains text-only LMs",
    "columns_unequal.json": "{p}: a JSON object of columns of different lengths (prompt: 2, chosen: 2, rejected: 1); "
                            "expected a JSON array of row objects, JSON Lines, or columns of equal length",
    "chosen_not_a_list.jsonl": ROW + "field 'chosen': expected a list of messages, got string",
    "empty_prompt_messages.jsonl": ROW + "field 'prompt': empty list of messages",
    "implicit_prompts_differ.jsonl": ROW + "field 'rejected': conversation differs from 'chosen' at message 0, before the final assistant turn",
    "implicit_no_assistant_reply.jsonl": ROW + "field 'rejected[0].role': the conversation must end with an assistant message, got 'user'",
    "hh_not_a_transcript.jsonl": ROW + "field 'chosen': not an HH transcript (expected '\\n\\nHuman: ... \\n\\nAssistant: ...')",
    "hh_prefixes_differ.jsonl": ROW + "field 'rejected': transcript differs from 'chosen' at character 11, before the final Assistant turn",
    "hh_no_assistant_turn.jsonl": ROW + "field 'rejected': HH transcript does not end with an 'Assistant:' turn after its last 'Human:' turn",
    "scored_one_completion.jsonl": ROW + "field 'completions': need at least 2 completions to form a pair, got 1",
    "scored_score_not_number.jsonl": ROW + "field 'completions[1].score': expected a number, got string",
    "scored_nan_score.jsonl": ROW + "field 'completions[1].score': expected a finite number, got nan",
    "scored_all_tied.jsonl": "{p}: no usable rows (1 scored rows gave no pair: scores tied or closer than min_score_gap, "
                             "or a single distinct completion)",
    "extra_values.csv": "{p} row 1: 4 values but the header has 3 columns",
    "duplicate_header.tsv": "{p}: header has column 'prompt' twice",
    "not_an_array.json": "{p}: expected a JSON array of objects, got string",
    "garbage.parquet": "{p}: not a readable parquet file (Could not open Parquet input source '<Buffer>': Parquet file "
                       "size is 29 bytes, smaller than the size reported by footer's (544499061bytes))",
    "images_column.jsonl": "{p}: column 'images' holds images, and dpokit trains text-only causal LMs; remove the "
                           "column to train on the text alone",
    "kto_unpaired.jsonl": "{p}: rows of prompt, completion and label are unpaired feedback (KTO's format); DPO needs a "
                          "chosen and a rejected completion per prompt",
    "text_prompt_assistant_lists.jsonl": "{p}: 'prompt' is text but 'chosen'/'rejected' are message lists; give the "
                                         "prompt as messages too ([{role: user, content: ...}]) or the completions as text",
    "prompt_not_in_conversation.jsonl": ROW + "field 'prompt': does not match any user turn of the conversation in "
                                              "'chosen' (with whole conversations in chosen/rejected the prompt is read from them)",
    "notes.txt": "{p}: unsupported file type .txt; expected one of .jsonl, .json, .csv, .tsv, .parquet, .arrow "
                 "(optionally .gz) or a datasets save_to_disk directory",
}


def test_the_bad_corpus_is_complete():
    assert sorted(p.name for p in BAD.iterdir()) == sorted(BAD_FILES) and len(BAD_FILES) >= 25


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_every_bad_file_gives_its_one_line_error_and_exit_2(name, capsys):
    path = str(BAD / name)
    assert check_main([path]) == 2
    captured = capsys.readouterr()
    assert captured.err == "error: " + BAD_FILES[name].replace("{p}", path) + "\n"
    assert captured.out == ""


# ------------------------------------------------------------------------------------------------- check


def _write(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_check_clean_file_with_tokenizer(tmp_path, hh_rows, capsys):
    rows, _ = hh_rows
    path = _write(tmp_path, "hh.jsonl", rows[:200])
    assert check_main([path, "--tokenizer", str(LLAMA2), "--max_length", "256"]) == 0
    out = capsys.readouterr().out
    assert f"{path}: 200 rows, format implicit_hh, 200 usable" in out
    assert "malformed rows: 0" in out and "exact duplicates: 0" in out
    assert "chosen longer than rejected (characters): " in out and "  prompt: p50=" in out
    assert "truncation max_length=256 max_prompt_length=None max_completion_length=None keep_start: " in out
    assert out.endswith("result: clean\n")


def test_check_reports_problems_with_exit_1(tmp_path, capsys):
    good = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(4)]
    rows = good + [good[0], {"prompt": "Q0", "chosen": "Yes!", "rejected": "no"}, {"prompt": "x", "chosen": "", "rejected": "y"}]
    train = _write(tmp_path, "train.jsonl", rows)
    held = _write(tmp_path, "eval.jsonl", [good[1], {"prompt": "new", "chosen": "a", "rejected": "b"}])
    assert check_main([train, "--eval", held]) == 1
    out = capsys.readouterr().out
    assert f"  {train}:7: field 'chosen': empty string" in out
    assert f"  {train}:5 repeats {train}:1" in out
    assert f"  {train}:6 ~ {train}:1" in out
    assert f"prompts also in {held}: 1" in out
    assert out.endswith(f"result: 1 malformed rows; 1 exact duplicates; 1 prompts shared with {held}\n")


def test_check_option_errors(tmp_path, capsys):
    path = _write(tmp_path, "t.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    assert check_main([path, "--max_length", "10"]) == 2
    assert capsys.readouterr().err == "error: --max_length needs --tokenizer (lengths are counted in tokens)\n"
    assert check_main([path, "--tokenizer", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.startswith("error: cannot load tokenizer ")
    assert check_main([path, "--kind", "rlhf"]) == 2
    assert "argument --kind: invalid choice" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- convert / filter / split


def test_convert_writes_canonical_rows(tmp_path):
    src = _write(tmp_path, "in.jsonl", [
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}])
    out = str(tmp_path / "out.jsonl")
    assert convert_main([src, out]) == 0
    assert [json.loads(line) for line in open(out)] == [
        {"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " hello", "rejected": " go away"}]
    assert convert_main([src, str(tmp_path / "out.csv")]) == 2


def test_filter_dedup_and_length(tmp_path):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 2 + [{"prompt": "long " * 50, "chosen": "a", "rejected": "b"}]
    src, out = _write(tmp_path, "in.jsonl", rows), str(tmp_path / "out.jsonl")
    assert filter_main([src, out, "--dedup", "--tokenizer", str(LLAMA2), "--max_length", "20"]) == 0
    assert [json.loads(line) for line in open(out)] == [rows[0]]
    assert filter_main([src, out, "--max_length", "20"]) == 2


def test_filter_and_convert_never_replace_their_input(tmp_path, capsys):
    """An output is never an input (the rows a filter drops would be gone); a real output is written whole."""
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 3 + [{"prompt": "r", "chosen": "a", "rejected": "b"}]
    src = _write(tmp_path, "in.jsonl", rows)
    before = Path(src).read_bytes()
    for main in (filter_main, convert_main):
        assert main([src, str(tmp_path / "sub" / ".." / "in.jsonl")]) == 2
        assert f"OUTPUT {tmp_path / 'sub' / '..' / 'in.jsonl'} is INPUT" in capsys.readouterr().err
    assert Path(src).read_bytes() == before
    assert filter_main([src, str(tmp_path / "out.jsonl"), "--dedup"]) == 0
    assert [json.loads(line) for line in open(tmp_path / "out.jsonl")] == [rows[0], rows[3]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]  # no temporary file left behind


def test_split_keeps_each_prompt_on_one_side(tmp_path):
    rows = [{"prompt": f"q{i % 10}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(40)]
    src = _write(tmp_path, "in.jsonl", rows)
    train, held = str(tmp_path / "train.jsonl"), str(tmp_path / "eval.jsonl")
    assert split_main([src, "--eval_fraction", "0.2", "--train_out", train, "--eval_out", held, "--seed", "3"]) == 0
    train_rows = [json.loads(line) for line in open(train)]
    held_rows = [json.loads(line) for line in open(held)]
    assert len(train_rows) == 32 and len(held_rows) == 8
    assert not {r["prompt"] for r in train_rows} & {r["prompt"] for r in held_rows}
    assert sorted(map(json.dumps, train_rows + held_rows)) == sorted(map(json.dumps, rows))
    assert split_main([src, "--eval_fraction", "1.5", "--train_out", train, "--eval_out", held]) == 2


# ------------------------------------------------------------------------------------- scored, input, dedup


def test_scored_strategies_and_ties():
    assert scored_pairs([1, 3, 3, 0], "best_vs_worst", 0) == [(1, 3)]
    assert scored_pairs([1, 3, 3, 0], "best_vs_rest", 0) == [(1, 0), (1, 3)]  # the tied 3 is never rejected
    assert scored_pairs([1, 3, 3, 0], "all_pairs", 0) == [(1, 0), (2, 0), (0, 3), (1, 3), (2, 3)]
    assert scored_pairs([1, 3, 3, 0], "all_pairs", 1.5) == [(1, 0), (2, 0), (1, 3), (2, 3)]
    assert scored_pairs([2, 2, 2], "all_pairs", 0) == []
    assert scored_pairs([1, 2], "best_vs_worst", 1.5) == []


def test_scored_rows_ultrafeedback_style_and_messages():
    rows = [{"prompt": "q", "completions": [{"response": "ok", "overall_score": 6.5}, {"response": "bad", "overall_score": 2},
                                            {"response": "meh", "overall_score": 4}]},
            {"prompt": "q2", "completions": [{"text": "x", "score": 1}, {"text": "y", "score": 1}]}]
    examples, report = preference_examples(rows, "<list>", pair_strategy="best_vs_rest")
    assert [(e.chosen, e.rejected, e.row) for e in examples] == [("ok", "bad", 0), ("ok", "meh", 0)]
    assert (report.format, report.read, report.kept, report.unpaired) == ("scored", 2, 2, 1)
    assert "1 rows without a scored pair" in report.summary()
    conv = [{"prompt": [{"role": "user", "content": "q"}], "completions": [{"text": "a", "score": 1}, {"text": "b", "score": 2}]}]
    (ex,), _ = preference_examples(conv, "<list>")
    assert (ex.chosen, ex.rejected) == ([{"role": "assistant", "content": "b"}], [{"role": "assistant", "content": "a"}])
    with pytest.raises(ConfigError, match="pair_strategy 'best' is not one of"):
        preference_examples(rows, "<list>", pair_strategy="best")
    with pytest.raises(ConfigError, match="min_score_gap must be a number >= 0"):
        preference_examples(rows, "<list>", min_score_gap=-1)


def test_input_column_is_folded_into_the_prompt():
    (ex,), _ = preference_examples([{"prompt": "Summarize:", "input": "long text", "chosen": "a", "rejected": "b"}], "<list>")
    assert ex.prompt == "Summarize:\n\nlong text"
    (ex,), _ = sft_examples([{"prompt": [{"role": "user", "content": "Summarize:"}], "context": "t",
                              "completion": [{"role": "assistant", "content": "s"}]}], "<list>")
    assert ex.prompt == [{"role": "user", "content": "Summarize:\n\nt"}]
    (ex,), _ = sft_examples([{"prompt": "p", "input": "", "completion": "c"}], "<list>")
    assert ex.prompt == "p"
    with pytest.raises(DataError, match="field 'context': row has both an 'input' and a 'context' column; keep one"):
        preference_examples([{"prompt": "p", "input": "i", "context": "c", "chosen": "a", "rejected": "b"}], "<list>")


def test_deduplicate_counts():
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 3 + [{"prompt": "q", "chosen": "a", "rejected": "c"}]
    examples, report = preference_examples(rows, "<list>", deduplicate=True)
    assert [e.row for e in examples] == [0, 3] and (report.read, report.kept, report.deduplicated) == (4, 2, 2)
    assert len(preference_examples(rows, "<list>")[0]) == 4


# ------------------------------------------------------------------------------------- round-trip properties

# Text without surrogates (JSON could carry them, tokenizers cannot) and without ":" so that generated text never
# contains an HH turn marker by accident.
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters=":"), min_size=1, max_size=20)


def _messages(roles):
    return st.tuples(*[TEXT for _ in roles]).map(lambda cs: [{"role": r, "content": c} for r, c in zip(roles, cs)])


PROMPT_MESSAGES = st.one_of(_messages(["user"]), _messages(["system", "user"]), _messages(["user", "assistant", "user"]))
REPLY = _messages(["assistant"])


def _round_trip(rows, parse, *, one_example_per_row=True):
    """rows -> examples -> canonical JSONL file -> examples again; both example lists must be equal (row indices
    too, except for scored data, whose rows expand into several pairs)."""
    first, _ = parse(rows, "<list>")
    with tempfile.TemporaryDirectory() as d:
        write_jsonl([canonical_row(e) for e in first], f"{d}/c.jsonl")
        again, _ = parse(*load_rows(f"{d}/c.jsonl"))
    if one_example_per_row:
        assert again == first
    else:
        assert [canonical_row(e) for e in again] == [canonical_row(e) for e in first]


PROPS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(TEXT, TEXT, TEXT, st.none() | TEXT)
def test_round_trip_standard(prompt, chosen, rejected, system):
    if chosen != rejected:
        _round_trip([{"prompt": prompt, "chosen": chosen, "rejected": rejected, "system": system}], preference_examples)


@PROPS
@given(PROMPT_MESSAGES, REPLY, REPLY)
def test_round_trip_conversational(prompt, chosen, rejected):
    if chosen != rejected:
        _round_trip([{"prompt": prompt, "chosen": chosen, "rejected": rejected}], preference_examples)


@PROPS
@given(PROMPT_MESSAGES, REPLY, REPLY)
def test_round_trip_implicit_conversational(prompt, chosen, rejected):
    if chosen != rejected:
        _round_trip([{"chosen": prompt + chosen, "rejected": prompt + rejected}], preference_examples)


@PROPS
@given(st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=3), TEXT, TEXT, TEXT)
def test_round_trip_implicit_hh(history, question, chosen, rejected):
    if chosen != rejected:
        head = "".join(f"\n\nHuman: {h}\n\nAssistant: {a}" for h, a in history) + f"\n\nHuman: {question}\n\nAssistant:"
        _round_trip([{"chosen": head + " " + chosen, "rejected": head + " " + rejected}], preference_examples)


@PROPS
@given(TEXT, st.lists(st.tuples(TEXT, st.integers(-5, 5)), min_size=2, max_size=4),
       st.sampled_from(["best_vs_worst", "best_vs_rest", "all_pairs"]))
def test_round_trip_scored(prompt, completions, strategy):
    rows = [{"prompt": prompt, "completions": [{"text": t, "score": s} for t, s in completions]}]
    try:
        pairs, _ = preference_examples(rows, "<list>", pair_strategy=strategy)
    except DataError:
        return  # every score tied (or texts equal): no pair, nothing to round-trip
    assert all(p.chosen != p.rejected for p in pairs)
    _round_trip(rows, lambda r, n: preference_examples(r, n, pair_strategy=strategy), one_example_per_row=False)


@PROPS
@given(st.sampled_from(["prompt_completion", "conversational_prompt_completion", "messages", "text"]), TEXT, TEXT,
       PROMPT_MESSAGES, REPLY)
def test_round_trip_sft(fmt, prompt, completion, prompt_messages, reply):
    row = {"prompt_completion": {"prompt": prompt, "completion": completion},
           "conversational_prompt_completion": {"prompt": prompt_messages, "completion": reply},
           "messages": {"messages": prompt_messages + reply},
           "text": {"text": completion}}[fmt]
    _round_trip([row], sft_examples)


def test_round_trip_whole_hh_file():
    _round_trip(load_rows(HH_FILE)[0], preference_examples)


# ------------------------------------------------------------------------------------- chat templates, truncation


def test_check_conversational_needs_a_template_and_takes_one_from_a_file(tmp_path, capsys):
    from .conftest import INST_TEMPLATE

    rows = [{"prompt": [{"role": "user", "content": f"Question {i}?"}], "chosen": [{"role": "assistant", "content": "Yes."}],
             "rejected": [{"role": "assistant", "content": "No."}]} for i in range(3)]
    path = _write(tmp_path, "conv.jsonl", rows)
    template = tmp_path / "inst.jinja"
    template.write_text(INST_TEMPLATE)
    # The plain Llama-2 tokenizer has no chat template: check cannot count tokens and says, naming the file and
    # before printing any of the report, what to set.
    assert check_main([path, "--tokenizer", str(LLAMA2)]) == 2
    captured = capsys.readouterr()
    assert captured.err == (f"error: {path}: conversational data needs a chat template, but the tokenizer has none; "
                            "set chat_template (a Jinja string or file) or use text data\n")
    assert captured.out == ""
    assert check_main([path, "--tokenizer", str(LLAMA2), "--chat_template", str(template), "--max_length", "64"]) == 0
    out = capsys.readouterr().out
    assert f"{path}: 3 rows, format conversational, 3 usable" in out and "  prompt: p50=" in out
    assert out.endswith("result: clean\n")
    assert check_main([path, "--chat_template", str(template)]) == 2
    assert capsys.readouterr().err == "error: --chat_template needs --tokenizer (the template renders for that tokenizer)\n"
    assert check_main([path, "--tokenizer", str(LLAMA2), "--chat_template", str(tmp_path / "none.jinja")]) == 2
    assert capsys.readouterr().err == (f"error: --chat_template {tmp_path / 'none.jinja'}: cannot read "
                                       f"(No such file or directory)\n")


def test_filter_drop_truncated_removes_rows_that_truncation_would_cut(tmp_path):
    short = {"prompt": "q", "chosen": "a", "rejected": "b"}
    long_prompt = {"prompt": "word " * 40, "chosen": "a", "rejected": "b"}  # cut (prompt) but kept by max_length=20
    long_reply = {"prompt": "q", "chosen": "yes " * 40, "rejected": "b"}  # chosen cut, still kept
    hopeless = {"prompt": "word " * 40, "chosen": "a " * 40, "rejected": "b"}
    src, out = _write(tmp_path, "in.jsonl", [short, long_prompt, long_reply]), str(tmp_path / "out.jsonl")
    limits = ["--tokenizer", str(LLAMA2), "--max_length", "20", "--truncation_mode", "keep_end"]
    # Without --drop_truncated only rows that would lose a whole completion go; the cut ones stay.
    assert filter_main([src, out, *limits]) == 0
    assert [json.loads(line) for line in open(out)] == [short, long_prompt, long_reply]
    assert filter_main([src, out, *limits, "--drop_truncated"]) == 0
    assert [json.loads(line) for line in open(out)] == [short]
    src2 = _write(tmp_path, "in2.jsonl", [short, hopeless])
    assert filter_main([src2, out, "--tokenizer", str(LLAMA2), "--max_length", "20"]) == 0
    assert [json.loads(line) for line in open(out)] == [short]
    assert filter_main([_write(tmp_path, "in3.jsonl", [long_reply]), out, *limits, "--drop_truncated"]) == 2


# ------------------------------------------------------------------------------------- scored: more layouts


def _pairs(rows, **kwargs):
    examples, report = preference_examples(rows, "<list>", **kwargs)
    return [(e.chosen, e.rejected) for e in examples], report


def test_scored_parallel_responses_and_scores_columns():
    rows = [{"prompt": "q", "responses": ["ok", "bad", "meh"], "scores": [3, 1, 2]},
            {"prompt": "q2", "responses": ["x", "y"], "scores": [2.0, 2.0]}]  # a tie: no pair
    pairs, report = _pairs(rows, pair_strategy="all_pairs")
    assert pairs == [("ok", "bad"), ("ok", "meh"), ("meh", "bad")]
    assert (report.format, report.kept, report.unpaired) == ("scored", 3, 1)
    conv = [{"prompt": [{"role": "user", "content": "q"}], "responses": ["a", [{"role": "assistant", "content": "b"}]],
             "scores": [0, 1]}]
    assert _pairs(conv)[0] == [([{"role": "assistant", "content": "b"}], [{"role": "assistant", "content": "a"}])]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "q", "responses": ["a", "b"], "scores": [1]}, "field 'scores': 1 scores for 2 responses"),
    ({"prompt": "q", "responses": ["a", "b"], "scores": [1, "2"]}, "field 'scores[1]': expected a number, got string"),
    ({"prompt": "q", "responses": "a", "scores": [1]}, "field 'responses': expected a list of completions, got string"),
    ({"prompt": "q", "responses": ["a"], "scores": [1]}, "field 'responses': need at least 2 completions to form a pair, got 1"),
    ({"prompt": "q", "responses": ["a", "b"]}, "field 'scores': missing"),
    ({"prompt": "q", "responses": ["a", ""], "scores": [1, 2]}, "field 'responses[1]': empty string"),
    ({"prompt": "q", "completions": [{"text": "a", "score": 1}, {"text": "b", "overall_score": 2}]},
     "field 'completions[1].overall_score': scored by 'overall_score' but completions[0] by 'score'; use one score key per row"),
    ({"prompt": "q", "completions": [{"text": "a", "annotations": {"honesty": {"Rating": "N/A"}}},
                                     {"text": "b", "annotations": {"honesty": {"Rating": "2"}}}]},
     "field 'completions[0].annotations': no numeric Rating in any aspect"),
    ({"prompt": "q", "completions": [{"text": "a", "annotations": {"honesty": "5"}}, {"text": "b", "score": 1}]},
     "field 'completions[1].score': scored by 'score' but completions[0] by 'annotations'; use one score key per row"),
    ({"prompt": "q", "completions": [{"text": "a", "annotations": {"honesty": "5"}}, {"text": "b", "annotations": {}}]},
     "field 'completions[0].annotations.honesty': expected an object with a 'Rating'"),
])
def test_scored_row_errors(row, message):
    with pytest.raises(DataError) as info:
        preference_examples([row], "<list>", dataset_format="scored")  # a row lacking "scores" is not detectable
    assert str(info.value) == "<list> row 1: " + message


def test_scored_ultrafeedback_rows():
    def completion(text, ratings, overall=None, fine=None):
        item = {"response": text, "annotations": {aspect: {"Rating": r, "Rationale": "..."} for aspect, r in ratings.items()}}
        if overall is not None:
            item["overall_score"] = overall
        if fine is not None:
            item["fine-grained_score"] = fine
        return item

    aspects = ("helpfulness", "honesty", "instruction_following", "truthfulness")
    # Only annotations: the score is the mean of the numeric ratings; "N/A" is left out (b: mean(4, 4) = 4 > 3.5).
    row = {"instruction": "Name a fruit.", "completions": [
        completion("apple", dict(zip(aspects, ["5", "4", "3", "2"]))),     # 3.5
        completion("banana", dict(zip(aspects, ["4", "N/A", "4", "4"]))),  # 4.0
        completion("rock", dict(zip(aspects, ["1", "1", "1", "1"]))),      # 1.0
        completion("pear", dict(zip(aspects, [4, 4, 4, "4"]))),            # 4.0: ties with banana, never a pair
    ]}
    pairs, report = _pairs([row], column_map={"instruction": "prompt"}, pair_strategy="all_pairs")
    assert pairs == [("banana", "apple"), ("apple", "rock"), ("pear", "apple"), ("banana", "rock"), ("pear", "rock")]
    assert report.format == "scored"
    assert _pairs([row], column_map={"instruction": "prompt"})[0] == [("banana", "rock")]  # first of the tied best
    # overall_score wins over fine-grained_score and annotations when present (on every completion of the row).
    row2 = {"prompt": "q", "completions": [completion("a", {"honesty": "1"}, overall=8.0, fine=1.0),
                                           completion("b", {"honesty": "5"}, overall=6.5, fine=5.0)]}
    assert _pairs([row2])[0] == [("a", "b")]
    row3 = {"prompt": "q", "completions": [completion("a", {"honesty": "1"}, fine=1.5),
                                           completion("b", {"honesty": "5"}, fine=4.75)]}
    assert _pairs([row3])[0] == [("b", "a")]
    tied = {"prompt": "q", "completions": [completion("a", {"honesty": "3"}), completion("b", {"honesty": "3.0"})]}
    with pytest.raises(DataError, match=r"no usable rows \(1 scored rows gave no pair"):
        preference_examples([tied], "<list>")


# ------------------------------------------------------------------------------------- QA probe fixes


def test_scored_repeated_text_counts_once_with_its_mean_score():
    # "same" is listed twice (1 and 5: mean 3). It used to give all_pairs both other > same and same > other, and
    # best_vs_worst picked "same" as both best and worst, then lost the row as "tied".
    row = {"prompt": "q", "completions": [{"text": "same", "score": 1}, {"text": "same", "score": 5},
                                          {"text": "other", "score": 2}]}
    for strategy in ("best_vs_worst", "best_vs_rest", "all_pairs"):
        pairs, report = _pairs([row], pair_strategy=strategy)
        assert pairs == [("same", "other")] and (report.kept, report.unpaired) == (1, 0), strategy
    tied = {"prompt": "q", "responses": ["same", "same", "other"], "scores": [1, 5, 3]}  # mean 3 ties with 3
    assert _pairs([tied, row], pair_strategy="all_pairs")[1].unpaired == 1
    conv = {"prompt": [{"role": "user", "content": "q"}], "responses": ["a", [{"role": "assistant", "content": "a"}], "b"],
            "scores": [4, 0, 1]}  # the plain "a" is the message "a": one text, mean 2 > 1
    assert _pairs([conv], pair_strategy="all_pairs")[0] == [([{"role": "assistant", "content": "a"}],
                                                            [{"role": "assistant", "content": "b"}])]
    one_text = {"prompt": "q", "completions": [{"text": "x", "score": 1}, {"text": "x", "score": 9}]}
    with pytest.raises(DataError, match=r"1 scored rows gave no pair: .* or a single distinct completion\)$"):
        preference_examples([one_text], "<list>")


def test_check_counts_whitespace_only_completions_on_the_hh_file(capsys):
    # Kept on purpose (saying nothing is a real HH preference) but never unseen: rows 87, 517, 926, 1104 have the
    # chosen final turn " ", and no rejected one is blank.
    check_main([str(HH_FILE), "--show", "10"])
    out = capsys.readouterr().out
    assert "pairs with a whitespace-only chosen or rejected (kept, trained on as given): 4\n" in out
    for line in (87, 517, 926, 1104):
        assert f"  {HH_FILE}:{line} chosen\n" in out


def test_check_whitespace_only_completions_are_information_not_problems(tmp_path, capsys):
    rows = [{"prompt": "q", "chosen": " ", "rejected": "no"}, {"prompt": "r", "chosen": "yes", "rejected": "\n"}]
    assert check_main([_write(tmp_path, "t.jsonl", rows)]) == 0
    out = capsys.readouterr().out
    assert "pairs with a whitespace-only chosen or rejected (kept, trained on as given): 2\n" in out
    assert out.endswith("result: clean\n")
    sft = _write(tmp_path, "s.jsonl", [{"prompt": "q", "completion": " "}, {"prompt": "r", "completion": "ok"}])
    assert check_main([sft, "--kind", "sft"]) == 0
    assert f"examples with a whitespace-only completion (kept, trained on as given): 1\n  {sft}:1 completion\n" \
        in capsys.readouterr().out


IDENTICAL_ONCE_CUT = {"prompt": "q", "chosen": " a b c d e", "rejected": " a b c d x"}  # 4 shared tokens


def test_check_and_filter_drop_pairs_identical_after_truncation(tmp_path, capsys):
    rows = [IDENTICAL_ONCE_CUT, {"prompt": "q", "chosen": " yes", "rejected": " no"}]
    src, out = _write(tmp_path, "in.jsonl", rows), str(tmp_path / "out.jsonl")
    limits = ["--tokenizer", str(LLAMA2), "--max_length", "64", "--max_completion_length", "4"]
    assert check_main([src, *limits]) == 0
    printed = capsys.readouterr().out
    assert ("max_completion_length=4 keep_start: 0 prompts cut, 0 rows with a completion cut, 1 rows dropped "
            "(1 with chosen identical to rejected once cut)\n") in printed
    assert filter_main([src, out, *limits]) == 0
    assert [json.loads(line) for line in open(out)] == rows[1:]
    assert "1 dropped by truncation (1 of them with chosen identical to rejected once tokenized and cut)" \
        in capsys.readouterr().out
    assert filter_main([_write(tmp_path, "one.jsonl", rows[:1]), out, *limits]) == 2
    assert capsys.readouterr().err.endswith("every row would be dropped by these length limits\n")
    assert filter_main([src, out, *limits[:-1], "5"]) == 0  # cut where they still differ: kept
    assert [json.loads(line) for line in open(out)] == rows


def test_split_refuses_one_file_for_both_sides_or_the_input(tmp_path, capsys):
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(10)]
    src = _write(tmp_path, "in.jsonl", rows)
    before = Path(src).read_bytes()
    same = str(tmp_path / "out.jsonl")
    other = str(tmp_path / "sub" / ".." / "out.jsonl")  # the same file, spelled differently
    assert split_main([src, "--eval_fraction", "0.2", "--train_out", same, "--eval_out", other]) == 2
    assert capsys.readouterr().err == (f"error: --train_out {same} is --eval_out {other}: two outputs may not share a "
                                       "path (the second would replace the first); choose another --eval_out\n")
    assert split_main([src, "--eval_fraction", "0.2", "--train_out", src, "--eval_out", same]) == 2
    assert f"--train_out {src} is INPUT {src}: an output may not be" in capsys.readouterr().err
    assert split_main([src, "--eval_fraction", "0.2", "--train_out", same, "--eval_out", src]) == 2
    assert f"--eval_out {src} is INPUT {src}: an output may not be" in capsys.readouterr().err
    assert Path(src).read_bytes() == before and not Path(same).exists()


def test_check_names_the_file_of_a_row_needing_a_chat_template_before_any_output(tmp_path, capsys):
    # Scored rows: the first has a text prompt, the third a message prompt, which needs the (missing) template.
    text = {"prompt": "q", "completions": [{"text": "a", "score": 1}, {"text": "b", "score": 2}]}
    rows = [text, text, dict(text, prompt=[{"role": "user", "content": "q"}])]
    path = _write(tmp_path, "mixed.jsonl", rows)
    assert check_main([path, "--tokenizer", str(LLAMA2)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {path}:3: conversational row, but tokenizer ")
    assert captured.out == ""
    conv = _write(tmp_path, "conv.jsonl", [dict(text, prompt=[{"role": "user", "content": "q"}])])
    assert check_main([conv, "--tokenizer", str(LLAMA2)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {conv}: scored data needs a chat template, but the tokenizer has none")


def test_scored_datas_count_line_says_rows_where_it_counts_rows_and_pairs_where_pairs():
    rows = [{"prompt": "q", "completions": [{"text": "a", "score": 1}, {"text": "b", "score": 2}, {"text": "c", "score": 3}]},
            {"prompt": "r", "completions": [{"text": "x", "score": 1}, {"text": "y", "score": 1}]},
            {"prompt": "q", "completions": [{"text": "a", "score": 1}, {"text": "b", "score": 2}]}]
    _, report = preference_examples(rows, "s.jsonl", pair_strategy="all_pairs", deduplicate=True)
    assert report.summary().startswith("s.jsonl (scored): 3 rows read, 0 skipped, 1 rows without a scored pair; "
                                       "3 pairs kept, 1 deduplicated, 0 dropped by truncation")
    _, report = preference_examples([{"prompt": "q", "chosen": "a", "rejected": "b"}], "p.jsonl")
    assert report.summary().startswith("p.jsonl (standard): 1 read, 1 kept, 0 skipped")  # rows are pairs
