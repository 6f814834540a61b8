"""Reading data sources through the real command line: a file that cannot be read is exit 2, one line naming it (and
its line), no traceback, and the file left as it was."""

from __future__ import annotations

import gzip
import json

import pytest

from conftest import refused

DEEP = 100_000
ROW = {"prompt": "q", "chosen": "a", "rejected": "b"}
DEEP_VALUE = "[" * DEEP + "]" * DEEP


def _lines(*lines: str) -> bytes:
    return "".join(line + "\n" for line in lines).encode()


CASES = {
    # JSON nested far deeper than Python's parser follows, in an otherwise valid row (it used to be a RecursionError).
    "deep.jsonl": (_lines(json.dumps(ROW), '{"prompt": "q", "chosen": "a", "rejected": "b", "meta": ' + DEEP_VALUE + "}"),
                   ":2: JSON nested too deeply to read"),
    "deep.json": (("[" + json.dumps(ROW) + ', {"meta": ' + DEEP_VALUE + "}]").encode(), ": JSON nested too deeply to read"),
    "deep_gzip.jsonl.gz": (gzip.compress(_lines(json.dumps(ROW), DEEP_VALUE)), ":2: JSON nested too deeply to read"),
    "bad_utf8.json": (b'[{"prompt": "q",\n "chosen": "\xc3\x28", "rejected": "b"}]', ":2: invalid UTF-8 (byte 0xc3)"),
    "cut_short.jsonl": (_lines(json.dumps(ROW)) + b'{"prompt": "q", "cho', ":2: invalid JSON (Unterminated string"),
}


@pytest.fixture(params=sorted(CASES))
def bad_file(request, tmp_path):
    content, message = CASES[request.param]
    path = tmp_path / request.param
    path.write_bytes(content)
    return path, f"{path}{message}"


@pytest.mark.parametrize("command", ["check", "convert", "split"])
def test_data_commands_refuse_an_unreadable_file_in_one_line(bad_file, command, tmp_path, capsys):
    path, message = bad_file
    argv = {"check": ["data", "check", path],
            "convert": ["data", "convert", path, tmp_path / "out.jsonl"],
            "split": ["data", "split", path, "--eval_fraction", "0.5", "--train_out", tmp_path / "a.jsonl",
                      "--eval_out", tmp_path / "b.jsonl"]}[command]
    before = sorted(tmp_path.iterdir())
    assert refused(capsys, argv, message, unchanged=[path]).startswith(f"error: {message}")
    assert sorted(tmp_path.iterdir()) == before  # nothing written


def test_pairs_refuses_an_unreadable_prompts_file_before_loading_a_model(bad_file, tmp_path, capsys):
    path, message = bad_file
    refused(capsys, ["pairs", "--model", tmp_path / "no-model", "--prompts", path, "--judge", "m:f",
                     "--output", tmp_path / "pairs.jsonl"], message, unchanged=[path])
    assert not (tmp_path / "pairs.jsonl").exists()
