"""Every preference format and every source kind through a real (1-step) DPO training on a tiny model.

The format x source matrix is not a full product: each format appears at least once, each source kind exactly once,
and one run goes through the `dpokit dpo` command line. Tables (CSV/TSV) can only hold text formats.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
from pathlib import Path

import pytest

from conftest import tiny_llama
from .conftest import HH_FILE, INST_TEMPLATE, LLAMA2


def _messages(*turns):
    return [{"role": role, "content": content} for role, content in zip(("user", "assistant") * len(turns), turns)]


def _reply(text):
    return [{"role": "assistant", "content": text}]


def _rows(fmt: str) -> list[dict]:
    """Four rows of `fmt` (two batches of 2 would also do; one step uses one batch)."""
    n = range(4)
    if fmt == "standard":
        return [{"prompt": f"What is {i} plus {i}?", "chosen": f" {2 * i}.", "rejected": " I do not know."} for i in n]
    if fmt == "standard_system":
        return [{"system": "Answer briefly.", "prompt": f"Name colour {i}.", "chosen": " Red.", "rejected": " Blue, I think."}
                for i in n]
    if fmt == "conversational":
        return [{"prompt": _messages(f"Hi {i}", "Hello!", "How are you?"), "chosen": _reply("Fine, thanks."),
                 "rejected": _reply("Go away.")} for i in n]
    if fmt == "implicit_conversational":
        return [{"chosen": _messages(f"Count to {i}.", "1, 2"), "rejected": _messages(f"Count to {i}.", "No.")} for i in n]
    if fmt == "implicit_hh":  # real Anthropic HH rows
        from dpokit.data import load_rows

        rows, _ = load_rows(HH_FILE)
        return [dict(rows[i]) for i in n]
    if fmt == "scored":  # UltraFeedback-style: text under "response", mean of the annotation ratings as the score
        return [{"prompt": f"Write {i} words.", "completions": [
            {"response": "word " * max(i, 1), "annotations": {"helpfulness": {"Rating": "5"}, "honesty": {"Rating": "4"}}},
            {"response": "No.", "annotations": {"helpfulness": {"Rating": "1"}, "honesty": {"Rating": "N/A"}}},
            {"response": "Maybe later.", "annotations": {"helpfulness": {"Rating": "2"}, "honesty": {"Rating": "3"}}}]}
            for i in n]
    if fmt == "scored_parallel":
        return [{"prompt": f"Rate {i}.", "responses": ["Good answer.", "Bad.", "Fine."], "scores": [9, 1, 5]} for i in n]
    raise ValueError(fmt)


def _write(rows: list[dict], kind: str, tmp: Path):
    """`rows` as a source of `kind`: a path for files and directories, the object itself otherwise."""
    import datasets

    path = tmp / f"train{kind}"
    if kind in (".jsonl", ".jsonl.gz"):
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if kind == ".jsonl.gz":
            with gzip.open(path, "wt") as f:
                f.write(text)
        else:
            path.write_text(text)
    elif kind == ".json":
        path.write_text(json.dumps(rows))
    elif kind in (".csv", ".tsv"):
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if kind == ".tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    elif kind == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif kind == ".arrow":
        import pyarrow as pa

        table = pa.Table.from_pylist(rows)
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    elif kind == "save_to_disk":
        path = tmp / "train_dir"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    elif kind == "list":
        return rows
    elif kind == "Dataset":
        return datasets.Dataset.from_list(rows)
    else:
        raise ValueError(kind)
    return str(path)


# (format, source kind): every format at least once, every source kind once.
CASES = [
    ("standard", ".csv"),
    ("standard_system", ".tsv"),
    ("implicit_hh", ".jsonl.gz"),
    ("conversational", ".jsonl"),
    ("implicit_conversational", ".parquet"),
    ("scored", ".json"),
    ("standard", ".arrow"),
    ("conversational", "save_to_disk"),
    ("implicit_hh", "list"),
    ("scored_parallel", "Dataset"),
]
DETECTED = {"standard_system": "standard", "scored_parallel": "scored"}


@pytest.fixture(scope="module")
def tok():
    """One Llama-2 tokenizer for the module, with a chat template (text rows without a system prompt ignore it)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(LLAMA2)
    tokenizer.chat_template = INST_TEMPLATE
    return tokenizer


def _config(output_dir: Path, **kwargs):
    from dpokit.config import DPOConfig

    return DPOConfig(output_dir=str(output_dir), max_steps=1, per_device_train_batch_size=2, save_steps=0,
                     disable_tqdm=True, logging_steps=1, max_length=128, truncation_mode="keep_end", **kwargs)
    # keep_end: HH transcripts run past 128 tokens; their prompts are cut from the left instead of dropping the row


def test_the_cases_cover_every_format_and_source():
    from dpokit.data import PREFERENCE_FORMATS

    assert {DETECTED.get(f, f) for f, _ in CASES} == set(PREFERENCE_FORMATS)
    assert len({kind for _, kind in CASES}) == len(CASES) == 10


@pytest.mark.parametrize("fmt, kind", CASES, ids=[f"{f}-{k}" for f, k in CASES])
def test_dpo_trains_on_each_format_and_source(fmt, kind, tok, tmp_path):
    from dpokit.trainer import DPOTrainer

    source = _write(_rows(fmt), kind, tmp_path)
    trainer = DPOTrainer(tiny_llama(vocab_size=32000), args=_config(tmp_path / "run"), train_dataset=source,
                         processing_class=tok)
    report = trainer.data_reports["train"]
    assert report.format == DETECTED.get(fmt, fmt)
    assert report.kept == 4 and report.skipped == 0
    metrics = trainer.train().metrics
    assert trainer.global_step == 1 and math.isfinite(metrics["loss"])
    if fmt == "standard_system":  # the system prompt reached the model input, as a system message of the template
        prompt = tok.decode(trainer.train_examples[0].prompt_ids, skip_special_tokens=True)
        assert prompt.startswith("<<SYS>>Answer briefly.<</SYS>>[INST] Name colour"), prompt


def test_dpokit_dpo_command_line_on_implicit_conversational_jsonl_with_a_chat_template_file(tmp_path, capsys):
    from transformers import AutoTokenizer

    from dpokit.cli import main

    model_dir = tmp_path / "model"
    tiny_llama(vocab_size=32000).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(LLAMA2).save_pretrained(model_dir)  # no chat template of its own
    template = tmp_path / "inst.jinja"
    template.write_text(INST_TEMPLATE)
    train_file = _write(_rows("implicit_conversational"), ".jsonl", tmp_path)
    capsys.readouterr()  # drop save_pretrained's progress output
    argv = ["dpo", f"model_name_or_path={model_dir}", f"train_file={train_file}", f"output_dir={tmp_path / 'run'}",
            "max_steps=1", "per_device_train_batch_size=2", "save_steps=0", "disable_tqdm=true", "logging_steps=1",
            "max_length=128", "truncation_mode=keep_end"]
    # Without a template the data is refused up front, in one line.
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dpokit dpo: error: {train_file}: implicit_conversational data needs a chat template")
    assert err.count("\n") == 1
    assert main(argv + [f"chat_template={template}", "overwrite_output_dir=true"]) == 0
    out = capsys.readouterr().out
    assert "saved" in out and "after 1 steps" in out
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(math.isfinite(r.get("loss", math.nan)) for r in records)
