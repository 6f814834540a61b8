"""Loading, format detection, validation and the HH transcript split (dpokit.data.formats)."""

from __future__ import annotations

import csv
import gzip
import json

import pytest

from dpokit.data import (
    PreferenceExample,
    SFTExample,
    load_rows,
    parse_hh_transcript,
    preference_examples,
    sft_examples,
    split_hh_transcript,
)
from dpokit.errors import ConfigError, DataError

from .conftest import HH_TEMPLATE

PAIRS = [
    {"prompt": "What is 2+2?", "chosen": " 4", "rejected": " 5"},
    {"prompt": "Capital of France?", "chosen": " Paris", "rejected": " Lyon", "system": "Be brief."},
]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path, rows, *, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def write_csv(path, rows, delimiter=","):
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields, delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)
    return path


def examples_of(source, **kwargs):
    rows, name = load_rows(source)
    return preference_examples(rows, name, **kwargs)


def bad_row_message(row, **kwargs):
    """The DataError message for a one-row dataset holding `row` (read from a list)."""
    with pytest.raises(DataError) as e:
        preference_examples([row], "<list>", **kwargs)
    return str(e.value)


# --------------------------------------------------------------------------------------------------- loading


def _save_file(tmp_path, kind):
    """Write PAIRS as `kind`; returns the path (csv/tsv leave the missing system as an empty string)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [dict(r, system=r.get("system")) for r in PAIRS]
    table = pa.Table.from_pylist(rows)
    if kind in ("jsonl", "jsonl.gz"):
        return write_jsonl(tmp_path / f"d.{kind}", PAIRS, gz=kind.endswith("gz"))
    if kind == "json":
        (tmp_path / "d.json").write_text(json.dumps(PAIRS))
        return tmp_path / "d.json"
    if kind == "json-lines":
        return write_jsonl(tmp_path / "d.json", PAIRS)
    if kind in ("csv", "tsv"):
        return write_csv(tmp_path / f"d.{kind}", PAIRS, "\t" if kind == "tsv" else ",")
    if kind == "csv.gz":
        plain = write_csv(tmp_path / "plain.csv", PAIRS)
        (tmp_path / "d.csv.gz").write_bytes(gzip.compress(plain.read_bytes()))
        return tmp_path / "d.csv.gz"
    if kind in ("parquet", "parquet.gz"):
        pq.write_table(table, tmp_path / "d.parquet")
        if kind == "parquet.gz":
            (tmp_path / "d.parquet.gz").write_bytes(gzip.compress((tmp_path / "d.parquet").read_bytes()))
        return tmp_path / f"d.{kind}"
    if kind == "arrow-stream":
        with pa.ipc.new_stream(tmp_path / "d.arrow", table.schema) as w:
            w.write_table(table)
        return tmp_path / "d.arrow"
    if kind == "arrow-file":
        with pa.ipc.new_file(tmp_path / "d.arrow", table.schema) as w:
            w.write_table(table)
        return tmp_path / "d.arrow"
    if kind == "save_to_disk":
        datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "ds")
        return tmp_path / "ds"
    if kind == "save_to_disk-dict":
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(tmp_path / "dd")
        return tmp_path / "dd"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "json", "json-lines", "csv", "tsv", "csv.gz", "parquet",
                                  "parquet.gz", "arrow-stream", "arrow-file", "save_to_disk", "save_to_disk-dict"])
def test_every_file_type_gives_the_same_examples(tmp_path, kind):
    examples, report = examples_of(_save_file(tmp_path, kind))
    assert report.format == "standard" and report.read == report.kept == 2
    assert examples == [
        PreferenceExample("What is 2+2?", " 4", " 5", 0, None),
        PreferenceExample("Capital of France?", " Paris", " Lyon", 1, "Be brief."),
    ]


def test_list_dataset_and_datasetdict_sources():
    import datasets

    rows, name = load_rows(PAIRS)
    assert (rows, name) == (PAIRS, "<list>")
    ds = datasets.Dataset.from_list(PAIRS)
    assert load_rows(ds)[1] == "<dataset>"
    dd = datasets.DatasetDict({"train": ds, "test": ds.select([0])})
    assert len(load_rows(dd, split="test")[0]) == 1
    with pytest.raises(DataError, match=r"^<dataset>: no split 'eval' \(splits: train, test\)$"):
        load_rows(dd, split="eval")


def test_jsonl_errors_name_the_line_and_blank_lines_still_count(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n\n" + json.dumps(dict(PAIRS[1], chosen="")) + "\n")
    with pytest.raises(DataError) as e:
        examples_of(path)
    assert str(e.value) == f"{path}:3: field 'chosen': empty string"
    _, report = examples_of(path, on_bad_rows="skip")
    assert report.skipped_rows == [{"row": 1, "reason": f"{path}:3: field 'chosen': empty string"}]
    assert report.where(1) == f"{path}:3"


@pytest.mark.parametrize("content, message", [
    (b'{"prompt": "a"}\n{"prompt": \n', r"d\.jsonl:2: invalid JSON \(Expecting value at column 12\)$"),
    (b'{"prompt": "a"}\n[1, 2]\n', r"d\.jsonl:2: expected a JSON object, got list$"),
    (b'{"prompt": "a"}\n{"prompt": "\xff"}\n', r"d\.jsonl:2: invalid UTF-8 \(byte 0xff at column 13\)$"),
])
def test_unreadable_jsonl_lines(tmp_path, content, message):
    (tmp_path / "d.jsonl").write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_rows(tmp_path / "d.jsonl")


def test_unreadable_sources(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file or directory$"):
        load_rows(tmp_path / "nope.jsonl")
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(DataError, match=r"d\.xlsx: unsupported file type \.xlsx; expected one of"):
        load_rows(tmp_path / "d.xlsx")
    (tmp_path / "d.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"d\.jsonl\.gz: cannot read gzip file \("):
        load_rows(tmp_path / "d.jsonl.gz")
    (tmp_path / "d.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(DataError, match=r"d\.parquet: not a readable parquet file \(") as e:
        load_rows(tmp_path / "d.parquet")
    assert "\n" not in str(e.value)
    (tmp_path / "dir").mkdir()
    with pytest.raises(DataError, match=r"dir: a directory, but not one written by datasets' save_to_disk"):
        load_rows(tmp_path / "dir")
    (tmp_path / "d.csv").write_text("prompt,chosen,rejected\na,b,c,d\n")
    with pytest.raises(DataError, match=r"d\.csv row 1: 4 values but the header has 3 columns$"):
        load_rows(tmp_path / "d.csv")
    (tmp_path / "d.json").write_text('{"a": 1}\n{"a": ')
    with pytest.raises(DataError, match=r"d\.json:2: invalid JSON"):
        load_rows(tmp_path / "d.json")
    with pytest.raises(DataError, match=r"cannot read data from a int"):
        load_rows(3)


def test_csv_error_names_the_data_row(tmp_path):
    path = write_csv(tmp_path / "d.csv", [PAIRS[0], dict(PAIRS[0], rejected=" 4")])
    with pytest.raises(DataError) as e:
        examples_of(path)
    assert str(e.value) == f"{path} row 2: field 'rejected': identical to 'chosen'"


@pytest.mark.parametrize("name, write", [
    ("d.jsonl", lambda path: write_jsonl(path, PAIRS, gz=True)),
    ("d.json", lambda path: path.write_bytes(gzip.compress(json.dumps(PAIRS).encode()))),
    ("d.csv", lambda path: path.write_bytes(gzip.compress(write_csv(path, PAIRS).read_bytes()))),
])
def test_gzip_content_under_a_name_without_gz_is_read_as_gzip(tmp_path, name, write):
    # Saved by a tool that compressed without renaming: the data is fine, only the suffix is missing (it used to
    # fail as "invalid UTF-8 (byte 0x8b at column 2)").
    path = tmp_path / name
    write(path)
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    examples, report = examples_of(path)
    assert [(e.prompt, e.chosen, e.system) for e in examples] == [(r["prompt"], r["chosen"], r.get("system")) for r in PAIRS]
    assert report.where(1) == (f"{path}:2" if name.endswith(".jsonl") else f"{path} row 2")
    (tmp_path / "broken.jsonl").write_bytes(gzip.compress(b'{"prompt": "q"}\n')[:12])
    with pytest.raises(DataError, match=r"broken\.jsonl: cannot read gzip file \("):
        load_rows(tmp_path / "broken.jsonl")


def test_json_object_of_columns_is_read_as_rows(tmp_path):
    columns = {k: [r.get(k) for r in PAIRS] for k in ("prompt", "chosen", "rejected", "system")}
    (tmp_path / "cols.json").write_text(json.dumps(columns, indent=2))
    examples, report = examples_of(tmp_path / "cols.json")
    assert examples == examples_of(PAIRS)[0] and report.where(1) == f"{tmp_path / 'cols.json'} row 2"
    # One conversational row whose message lists happen to be equally long stays one row: message objects are not
    # column values.
    (tmp_path / "one.json").write_text(json.dumps({"prompt": [user("q")], "chosen": [assistant("a")],
                                                   "rejected": [assistant("b")]}))
    (ex,), report = examples_of(tmp_path / "one.json")
    assert report.format == "conversational" and ex.chosen == [assistant("a")]
    (tmp_path / "uneven.json").write_text(json.dumps({"prompt": ["q", "r"], "chosen": ["a", "b"], "rejected": ["c"]}))
    with pytest.raises(DataError, match=r"uneven\.json: a JSON object of columns of different lengths \(prompt: 2, "
                                        r"chosen: 2, rejected: 1\); expected a JSON array of row objects"):
        load_rows(tmp_path / "uneven.json")


# --------------------------------------------------------------------------------------------------- formats


def test_conversational_with_system_column():
    row = {"prompt": [user("hi")], "chosen": [assistant("hello")], "rejected": [assistant("go away")], "system": "Be nice."}
    (ex,), report = preference_examples([row], "<list>")
    assert report.format == "conversational"
    assert ex.prompt == [{"role": "system", "content": "Be nice."}, user("hi")]
    assert (ex.chosen, ex.rejected, ex.system) == ([assistant("hello")], [assistant("go away")], None)


def test_implicit_conversational_splits_at_the_last_assistant_turn():
    history = [{"role": "system", "content": "s"}, user("a"), assistant("b"), user("c")]
    row = {"chosen": history + [assistant("good")], "rejected": history + [assistant("bad")]}
    (ex,), report = preference_examples([row], "<list>")
    assert report.format == "implicit_conversational"
    assert (ex.prompt, ex.chosen, ex.rejected) == (history, [assistant("good")], [assistant("bad")])


def test_text_prompt_beside_whole_conversations_is_redundant_as_in_trl():
    """UltraFeedback-binarized rows: a text prompt plus chosen/rejected that hold the whole conversation. As in TRL
    (`maybe_extract_prompt`), the prompt comes from the conversations; the text must be one of their user turns."""
    conversation = [user("What is 2+2?")]
    row = {"prompt": "What is 2+2?", "chosen": conversation + [assistant("4")],
           "rejected": conversation + [assistant("5")], "score_chosen": 8.0, "score_rejected": 3.0}
    (ex,), report = preference_examples([row], "<list>")
    assert report.format == "implicit_conversational"
    assert (ex.prompt, ex.chosen, ex.rejected) == (conversation, [assistant("4")], [assistant("5")])
    message = bad_row_message(dict(row, prompt="What is 3+3?"))
    assert "field 'prompt': does not match any user turn of the conversation in 'chosen'" in message


def test_implicit_hh_keeps_text():
    row = {"chosen": "\n\nHuman: hi\n\nAssistant: hey\n\nHuman: joke?\n\nAssistant: Knock knock.",
           "rejected": "\n\nHuman: hi\n\nAssistant: hey\n\nHuman: joke?\n\nAssistant: No."}
    (ex,), report = preference_examples([row], "<list>")
    assert report.format == "implicit_hh"
    assert ex.prompt == "\n\nHuman: hi\n\nAssistant: hey\n\nHuman: joke?\n\nAssistant:"
    assert (ex.chosen, ex.rejected) == (" Knock knock.", " No.")


def test_column_map_and_explicit_format():
    rows = [{"question": "q", "good": "a", "bad": "b", "id": 7}]
    (ex,), report = preference_examples(rows, "<list>", column_map={"question": "prompt", "good": "chosen", "bad": "rejected"},
                                        dataset_format="standard")
    assert (ex.prompt, ex.chosen, ex.rejected, report.format) == ("q", "a", "b", "standard")
    with pytest.raises(DataError, match=r"^<list>: column_map names column 'query', which is not in the data \(columns: question, good, bad, id\)$"):
        preference_examples(rows, "<list>", column_map={"query": "prompt"})
    with pytest.raises(DataError, match=r"column_map renames 'question' to 'id', but the data already has a 'id' column"):
        preference_examples(rows, "<list>", column_map={"question": "id"})
    with pytest.raises(ConfigError, match=r"dataset_format 'pairs' is not one of: auto, standard, conversational"):
        preference_examples(rows, "<list>", dataset_format="pairs")
    with pytest.raises(ConfigError, match=r"on_bad_rows 'ignore'"):
        preference_examples(rows, "<list>", on_bad_rows="ignore")


def test_column_map_on_a_dataset_and_jsonl_keeps_line_numbers(tmp_path):
    import datasets

    (ex,), _ = preference_examples(datasets.Dataset.from_list([{"q": "x", "chosen": "a", "rejected": "b"}]), "<dataset>",
                                   column_map={"q": "prompt"})
    assert ex.prompt == "x"
    path = write_jsonl(tmp_path / "t.jsonl", [{"q": "x", "chosen": "a", "rejected": "b"}, {"q": "", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"t\.jsonl:2: field 'prompt': empty string$"):
        examples_of(path, column_map={"q": "prompt"})


def test_undetectable_format_and_explicit_format_mismatch():
    with pytest.raises(DataError, match=r"^<list>: cannot detect a preference format from columns \[answer, question\]; expected"):
        preference_examples([{"question": "q", "answer": "a"}], "<list>")
    msg = bad_row_message({"prompt": "q", "chosen": "a", "rejected": "b"}, dataset_format="conversational")
    assert msg == "<list> row 1: field 'prompt': expected a list of messages, got string"
    with pytest.raises(DataError, match="needs a chat template, but the tokenizer has none; set chat_template"):
        preference_examples([{"prompt": [user("q")], "chosen": [assistant("a")], "rejected": [assistant("b")]}],
                            "<list>", chat_template_available=False)


# ------------------------------------------------------------------------------------------------ validation

CONV = {"prompt": [user("q")], "chosen": [assistant("a")], "rejected": [assistant("b")]}
HH_C = "\n\nHuman: q\n\nAssistant: a"


@pytest.mark.parametrize("row, message", [
    ({"prompt": "q", "chosen": "a", "rejected": None}, "field 'rejected': missing"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "field 'prompt': empty string"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "field 'chosen': expected a string, got integer"),
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, "field 'rejected': identical to 'chosen'"),
    ({"prompt": "q", "chosen": "a\ud800", "rejected": "b"}, "field 'chosen': invalid Unicode (lone surrogate U+D800 at character 2)"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "system": 1}, "field 'system': expected a string, got integer"),
    (dict(CONV, prompt=[{"role": "bot", "content": "q"}]), "field 'prompt[0].role': unknown role 'bot' (expected system, user, assistant, tool)"),
    (dict(CONV, prompt=[{"content": "q"}]), "field 'prompt[0].role': missing"),
    (dict(CONV, prompt=[{"role": "user", "content": 5}]), "field 'prompt[0].content': expected a string, got integer"),
    (dict(CONV, prompt=[user("q"), {"role": "system", "content": "s"}, user("r")]), "field 'prompt[1].role': a system message must come first"),
    (dict(CONV, prompt=[user("q"), assistant("prefill")]), "field 'prompt[1].role': the prompt must end with a user (or tool) message, got 'assistant'"),
    (dict(CONV, prompt=[{"role": "system", "content": "s"}]), "field 'prompt': no user message"),
    (dict(CONV, prompt=[]), "field 'prompt': empty list of messages"),
    (dict(CONV, chosen=[user("a")]), "field 'chosen[0].role': expected 'assistant', got 'user'"),
    (dict(CONV, chosen=[assistant("")]), "field 'chosen[0].content': empty string"),
    (dict(CONV, chosen=assistant("a")), "field 'chosen': expected a list of messages, got object"),
    (dict(CONV, chosen=["a"]), "field 'chosen[0]': expected a message object, got string"),
    (dict(CONV, rejected=[assistant("a")]), "field 'rejected': identical to 'chosen'"),
    (dict(CONV, system="s", prompt=[{"role": "system", "content": "t"}, user("q")]), "field 'system': row has both a 'system' column and a system message in 'prompt'"),
    ({"chosen": [user("q"), assistant("a")], "rejected": [user("Q"), assistant("b")]},
     "field 'rejected': conversation differs from 'chosen' at message 0, before the final assistant turn"),
    ({"chosen": [user("q"), assistant("a")], "rejected": [user("q")]},
     "field 'rejected[0].role': the conversation must end with an assistant message, got 'user'"),
    ({"chosen": [assistant("a")], "rejected": [user("q"), assistant("b")]},
     "field 'chosen': the conversation has no user message before the assistant reply"),
    ({"chosen": "just text", "rejected": "other text"},
     "field 'chosen': not an HH transcript (expected '\\n\\nHuman: ... \\n\\nAssistant: ...')"),
    ({"chosen": "\n\nAssistant: hi", "rejected": "\n\nAssistant: ho"}, "field 'chosen': HH transcript has no 'Human:' turn"),
    ({"chosen": HH_C, "rejected": "\n\nHuman: q"},
     "field 'rejected': HH transcript does not end with an 'Assistant:' turn after its last 'Human:' turn"),
    ({"chosen": HH_C, "rejected": "\n\nHuman: Q\n\nAssistant: b"},
     "field 'rejected': transcript differs from 'chosen' at character 10, before the final Assistant turn"),
    ({"chosen": "\n\nHuman: q\n\nAssistant:", "rejected": HH_C}, "field 'chosen': empty final Assistant turn"),
    ({"chosen": HH_C, "rejected": HH_C}, "field 'rejected': identical to 'chosen'"),
])
def test_row_errors_are_one_line_and_name_the_field(row, message):
    full = bad_row_message(row)
    assert full == f"<list> row 1: {message}"
    assert "\n" not in full


def test_a_row_without_a_column_the_others_have():
    with pytest.raises(DataError, match=r"^<list> row 2: field 'rejected': missing$"):
        preference_examples([PAIRS[0], {"prompt": "q", "chosen": "a"}], "<list>")


def test_a_row_that_is_not_an_object():
    with pytest.raises(DataError, match=r"^<list> row 2: expected a row object, got string$"):
        preference_examples([PAIRS[0], "not a dict"], "<list>")


def test_error_mode_counts_further_problems_and_skip_mode_records_them():
    rows = [dict(PAIRS[0], chosen="")] + [PAIRS[0]] * 3 + [dict(PAIRS[0], rejected=None)] * 7
    with pytest.raises(DataError) as e:
        preference_examples(rows, "<list>")
    assert str(e.value) == "<list> row 1: field 'chosen': empty string (+7 more)"
    assert len(e.value.problems) == 5 and e.value.problems[1] == "<list> row 5: field 'rejected': missing"
    examples, report = preference_examples(rows, "<list>", on_bad_rows="skip")
    assert [ex.row for ex in examples] == [1, 2, 3]
    assert (report.read, report.kept, report.skipped) == (11, 3, 8)
    assert report.skipped_rows[0] == {"row": 0, "reason": "<list> row 1: field 'chosen': empty string"}
    assert [s["row"] for s in report.skipped_rows] == [0] + list(range(4, 11))


def test_empty_and_all_bad_datasets_are_errors(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no rows$"):
        examples_of(path)
    with pytest.raises(DataError, match=r"empty\.jsonl: no rows$"):
        examples_of(path, dataset_format="standard")
    with pytest.raises(DataError, match=r"^<list>: all 2 rows are malformed or unusable; first: <list> row 1: field 'chosen': empty string$"):
        preference_examples([dict(PAIRS[0], chosen="")] * 2, "<list>", on_bad_rows="skip")


def test_report_summary_is_one_line():
    _, report = preference_examples(PAIRS + [dict(PAIRS[0], chosen="")], "train.jsonl", on_bad_rows="skip")
    summary = report.summary()
    assert summary.startswith("train.jsonl (standard): 3 read, 2 kept, 1 skipped, 0 deduplicated")
    assert "\n" not in summary


def test_content_as_text_parts_is_joined():
    parts = [{"type": "text", "text": "Look at this."}, {"type": "text", "text": "What is it?"}]
    row = {"prompt": [{"role": "user", "content": parts}], "chosen": [{"role": "assistant", "content": parts[:1]}],
           "rejected": [assistant("No idea.")]}
    (ex,), _ = preference_examples([row], "<list>")
    assert ex.prompt == [user("Look at this.\nWhat is it?")] and ex.chosen == [assistant("Look at this.")]


@pytest.mark.parametrize("content, message", [
    ([{"type": "text", "text": "q"}, {"type": "image", "url": "cat.png"}],
     "field 'prompt[0].content[1]': image parts are not supported: dpokit trains text-only LMs"),
    ([{"type": "input_audio", "input_audio": {}}],
     "field 'prompt[0].content[0]': input_audio parts are not supported: dpokit trains text-only LMs"),
    ([], "field 'prompt[0].content': empty list of content parts"),
    (["q"], 'field \'prompt[0].content[0]\': expected a text part {"type": "text", "text": ...}, got string'),
    ([{"text": "q"}], "field 'prompt[0].content[0].type': missing"),
    ([{"type": "text"}], "field 'prompt[0].content[0].text': missing"),
    ([{"type": "text", "text": 3}], "field 'prompt[0].content[0].text': expected a string, got integer"),
])
def test_content_parts_other_than_text_are_refused_by_name(content, message):
    assert bad_row_message(dict(CONV, prompt=[{"role": "user", "content": content}])) == f"<list> row 1: {message}"


# ---------------------------------------------------------------------------------------------------- SFT


def test_sft_formats():
    history = [user("a"), assistant("b"), user("c")]
    cases = {
        "prompt_completion": ({"prompt": "p", "completion": "c"}, SFTExample("p", "c", 0)),
        "conversational_prompt_completion": ({"prompt": history, "completion": [assistant("d")]}, SFTExample(history, [assistant("d")], 0)),
        "messages": ({"messages": history + [assistant("d")]}, SFTExample(history, [assistant("d")], 0)),
        "text": ({"text": "all of it"}, SFTExample("", "all of it", 0)),
    }
    for fmt, (row, expected) in cases.items():
        (ex,), report = sft_examples([row], "<list>")
        assert (ex, report.format) == (expected, fmt)


@pytest.mark.parametrize("row, message", [
    ({"messages": [user("a")]}, "field 'messages[0].role': the last message must be from the assistant, got 'user'"),
    ({"messages": [assistant("a")]}, "field 'messages': no user message before the assistant reply"),
    ({"messages": [user("a"), assistant("b"), assistant("c")]}, "field 'messages[1].role': the prompt must end with a user (or tool) message, got 'assistant'"),
    ({"text": ""}, "field 'text': empty string"),
    ({"prompt": "p", "completion": ["c"]}, "field 'completion': expected a string, got list"),
])
def test_sft_row_errors(row, message):
    with pytest.raises(DataError) as e:
        sft_examples([row], "<list>")
    assert str(e.value) == f"<list> row 1: {message}"


def test_sft_undetectable():
    with pytest.raises(DataError, match=r"cannot detect an SFT format from columns \[chosen, prompt, rejected\]"):
        sft_examples(PAIRS[:1], "<list>")


# ------------------------------------------------------------------------------------------------ HH file


def test_hh_file_loads_whole_as_implicit_prompt_text(hh_rows):
    rows, name = hh_rows
    examples, report = preference_examples(rows, name)
    assert (report.format, report.read, report.kept, report.skipped) == ("implicit_hh", 2312, 2312, 0)
    for ex, row in zip(examples, rows):
        assert isinstance(ex.prompt, str) and ex.prompt.endswith("\n\nAssistant:")
        assert ex.prompt + ex.chosen == row["chosen"] and ex.prompt + ex.rejected == row["rejected"]
        # the completion is what answers the last Human turn; no Human turn follows the prompt
        assert "\n\nHuman:" not in ex.chosen and "\n\nHuman:" not in ex.rejected
        assert "\n\nHuman:" in ex.prompt.rsplit("\n\nAssistant:", 2)[-2] or ex.prompt.startswith("\n\nHuman:")
    # almost every row's completion is exactly the final assistant turn; the five irregular HH rows have two
    # assistant turns in a row at the end of one side, and both belong to the answer.
    multi = [ex.row for ex in examples if "\n\nAssistant:" in ex.chosen + ex.rejected]
    assert multi == [1254, 1688, 1950, 1952, 2036]


def test_hh_transcripts_parse_to_messages_that_render_back(hh_rows, llama2_chat):
    rows, _ = hh_rows
    llama2_chat.chat_template = HH_TEMPLATE
    for row in rows[:300]:
        for side in ("chosen", "rejected"):
            messages = parse_hh_transcript(row[side])
            assert [m["role"] for m in messages][:2] == ["user", "assistant"]
            assert llama2_chat.apply_chat_template(messages, tokenize=False) == "<s>" + row[side]
        prompt, _ = split_hh_transcript(row["chosen"])
        head = parse_hh_transcript(prompt + " x")[:-1]  # the prompt's turns, without the reply
        assert llama2_chat.apply_chat_template(head, add_generation_prompt=True, tokenize=False) == "<s>" + prompt


def test_parse_hh_transcript_details():
    assert parse_hh_transcript("\n\nHuman: hi\n\nAssistant: Human: quoted inline\n\nAssistant:") == [
        user("hi"), assistant("Human: quoted inline"), assistant("")]
    assert parse_hh_transcript("Human: no leading blank line\n\nAssistant: ok") == [user("no leading blank line"), assistant("ok")]
    with pytest.raises(ValueError, match="not an HH transcript"):
        parse_hh_transcript("preamble\n\nHuman: hi")


def test_hub_names_go_through_datasets_load_dataset(monkeypatch):
    import datasets

    from dpokit.data import load_rows
    from dpokit.errors import DataError

    calls = []

    def fake_load_dataset(name, config_name=None, split="train"):
        calls.append((name, split))
        return datasets.Dataset.from_list([{"prompt": "p", "chosen": "a", "rejected": "b"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows, name = load_rows("someorg/prefs", split="test")
    assert calls == [("someorg/prefs", "test")] and name == "someorg/prefs" and len(rows) == 1

    def offline(name, config_name=None, split="train"):
        raise ConnectionError("offline mode is enabled")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"someorg/prefs: no such file or directory, and loading it as a Hub data set "
                                        r"failed \(offline mode is enabled\)"):
        load_rows("someorg/prefs")
    with pytest.raises(DataError, match="missing.jsonl: no such file or directory$"):
        load_rows("missing.jsonl")
