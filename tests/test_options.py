"""Numeric command-line options are checked where each parser declares them (`dpokit.options`): out of range or not a
number, one line naming the option, exit code 2, before any file or model is read."""

from __future__ import annotations

import pytest

from conftest import refused

EVAL = ["eval", "--model", "no-such-model", "--pairs", "no-such-pairs.jsonl"]
PAIRS = ["pairs", "--model", "no-such-model", "--prompts", "no-such.jsonl", "--judge", "m:f", "--output", "p.jsonl"]
SWEEP = ["sweep", "--prompts", "no-such.jsonl", "--judge", "m:f"]
SPLIT = ["data", "split", "no-such.jsonl", "--train_out", "a.jsonl", "--eval_out", "b.jsonl"]


@pytest.mark.parametrize("argv, message", [
    (EVAL + ["--batch_size", "0"], "dpokit eval: error: --batch_size must be an integer >= 1 (got 0)"),
    (EVAL + ["--num_samples", "0"], "--num_samples must be an integer >= 1 (got 0)"),
    (EVAL + ["--max_new_tokens", "-3"], "--max_new_tokens must be an integer >= 1 (got -3)"),
    (EVAL + ["--max_length", "0"], "--max_length must be an integer >= 1 (got 0)"),
    (EVAL + ["--temperature", "0"], "--temperature must be a number > 0 (got 0)"),
    (EVAL + ["--top_p", "1.5"], "--top_p must be a number in (0, 1] (got 1.5)"),
    (EVAL + ["--top_p", "nan"], "--top_p must be a number in (0, 1] (got nan)"),
    (EVAL + ["--beta", "-0.1"], "--beta must be a number > 0 (got -0.1)"),
    (EVAL + ["--seed", "-1"], "--seed must be an integer in [0, 4294967295] (got -1)"),
    (EVAL + ["--batch_size", "eight"], "--batch_size must be an integer >= 1 (got eight)"),
    (["eval", "--pairs", "p.jsonl"], "dpokit eval: error: the following arguments are required: --model"),
    (PAIRS + ["--num_samples", "1"], "--num_samples must be an integer >= 2 (got 1)"),
    (PAIRS + ["--top_p", "0"], "--top_p must be a number in (0, 1] (got 0)"),
    (PAIRS + ["--temperature", "-1"], "--temperature must be a number > 0 (got -1)"),
    (PAIRS + ["--batch_size", "0"], "--batch_size must be an integer >= 1 (got 0)"),
    (PAIRS + ["--max_new_tokens", "0"], "--max_new_tokens must be an integer >= 1 (got 0)"),
    (PAIRS + ["--min_score_gap", "-1"], "--min_score_gap must be a number >= 0 (got -1)"),
    (PAIRS + ["--beta", "0"], "--beta must be a number > 0 (got 0)"),
    (PAIRS + ["--column_map", "[1]"], "argument --column_map: expected a JSON object"),
    (SWEEP + ["--num_samples", "0"], "dpokit sweep: error: --num_samples must be an integer >= 1 (got 0)"),
    (SWEEP + ["--temperature", "0"], "--temperature must be a number > 0 (got 0)"),
    (SWEEP + ["--max_new_tokens", "0"], "--max_new_tokens must be an integer >= 1 (got 0)"),
    (SWEEP + ["--batch_size", "0"], "--batch_size must be an integer >= 1 (got 0)"),
    (SPLIT + ["--eval_fraction", "0"], "error: --eval_fraction must be a number in (0, 1) (got 0)"),
    (SPLIT + ["--eval_fraction", "1"], "--eval_fraction must be a number in (0, 1) (got 1)"),
    (SPLIT + ["--eval_fraction", "0.2", "--seed", "x"], "--seed must be an integer in [0, 4294967295] (got x)"),
    (["data", "check", "no-such.jsonl", "--max_length", "0"], "--max_length must be an integer >= 1 (got 0)"),
    (["data", "check", "no-such.jsonl", "--max_prompt_length", "-1"], "--max_prompt_length must be an integer >= 1"),
    (["data", "check", "no-such.jsonl", "--show", "-1"], "--show must be an integer >= 0 (got -1)"),
    (["data", "check", "no-such.jsonl", "--min_score_gap", "-2"], "--min_score_gap must be a number >= 0 (got -2)"),
    (["data", "filter", "in.jsonl", "out.jsonl", "--max_completion_length", "0"],
     "--max_completion_length must be an integer >= 1 (got 0)"),
    (["data", "convert", "in.jsonl", "out.jsonl", "--column_map", "{bad"], "argument --column_map: expected a JSON"),
    (["bench", "--steps", "0"], "dpokit bench: error: --steps must be an integer >= 1 (got 0)"),
    (["bench", "--trl-micro-batches", "2", "0"], "--trl-micro-batches must be an integer >= 1 (got 0)"),
    (["demo", "--seed", "-5"], "dpokit demo: error: --seed must be an integer in [0, 4294967295] (got -5)"),
    (["data", "audit", "p.jsonl", "--model", "m", "--output", "a.jsonl", "--batch_size", "0"],
     "--batch_size must be an integer >= 1 (got 0)"),
    (["data", "audit", "p.jsonl", "--model", "m", "--output", "a.jsonl", "--show", "-1"],
     "--show must be an integer >= 0 (got -1)"),
    (["data", "filter", "in.jsonl", "out.jsonl", "--audit", "a.jsonl", "--drop_top", "0"],
     "--drop_top must be an integer >= 1 (got 0)"),
    (["annotate", "serve", "--db", "d.sqlite", "--lease_minutes", "nan"], "--lease_minutes must be a number in (0, 10080]"),
    (["annotate", "serve", "--db", "d.sqlite", "--port", "70000"], "--port must be an integer in [0, 65535]"),
    (["annotate", "export", "--db", "d.sqlite", "--show", "-5"], "--show must be an integer >= 0 (got -5)"),
])
def test_out_of_range_options_are_one_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(capsys, argv, message)
    assert list(tmp_path.iterdir()) == []  # nothing read, nothing written


def test_a_numeric_option_must_declare_its_range():
    from dpokit.options import Parser

    with pytest.raises(TypeError, match="declare its range"):
        Parser(prog="x").add_argument("--batch_size", type=int)


@pytest.mark.parametrize("argv", [[c, "--help"] for c in ("eval", "export", "pairs", "report", "sweep", "bench",
                                                          "demo", "dpo", "sft")]
                         + [["data", c, "--help"] for c in ("check", "convert", "filter", "split", "audit")]
                         + [["annotate", c, "--help"] for c in ("serve", "export", "import", "tokens")])
def test_every_commands_parser_is_built_by_the_rules(argv, capsys):
    """Every parser is built when its --help is asked for: a bare type=int, or any other breach of the rules of
    `dpokit.options.Parser`, fails here rather than in a user's hands."""
    from dpokit.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    assert code in (0, None), capsys.readouterr().err
    assert "usage" in capsys.readouterr().out.lower()
