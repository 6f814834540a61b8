"""The Trainer API a TRL user reaches for: evaluate(eval_dataset=...) on any source, a dict of evaluation sets (and
several eval files from YAML), the attributes TRL's trainers have, TensorBoard tags and logging_dir as transformers
writes them, fractional epochs everywhere."""

import json

import pytest

from conftest import EVEN_ODD_PAIRS, quick_dpo_config, tiny_llama
from dpokit import DPOConfig, DPOTrainer, SFTTrainer
from dpokit.errors import ConfigError

PAIRS = EVEN_ODD_PAIRS


cfg = quick_dpo_config


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_evaluate_takes_any_source_and_a_dict_of_sets(tmp_path, tok):
    import datasets

    path = tmp_path / "held.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PAIRS[:2]))
    t = DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path), train_dataset=PAIRS,
                   eval_dataset={"a": PAIRS[:2], "b": PAIRS[2:4]}, processing_class=tok)
    t.train()
    # One record per set, as transformers logs each set of a dict eval_dataset.
    last = {k: v for r in records(tmp_path / "run") if r["step"] == 3 for k, v in r.items()}
    assert "eval_a/loss" in last and "eval_b/loss" in last
    ev = t.evaluate()
    assert {"eval_a_loss", "eval_b_loss", "eval_a_rewards/accuracies", "epoch"} <= set(ev)
    assert ev["eval_a_loss"] == pytest.approx(last["eval_a/loss"], rel=1e-6)
    # Any source the constructor takes gives the same numbers: a path, a datasets.Dataset, a list of rows.
    for source in (str(path), datasets.Dataset.from_list(PAIRS[:2]), PAIRS[:2]):
        assert t.evaluate(eval_dataset=source)["eval_loss"] == pytest.approx(ev["eval_a_loss"], rel=1e-6)
    two = t.evaluate(eval_dataset={"x": PAIRS[:2], "y": str(path)})
    assert two["eval_x_loss"] == pytest.approx(two["eval_y_loss"], rel=1e-6)
    assert t.data_reports.keys() == {"train", "eval_a", "eval_b"}  # evaluate() does not replace the run's report
    assert "eval_y_loss" in t.state.log_history[-1]  # logged as transformers logs an evaluation
    with pytest.raises(ConfigError, match="set name '' must be a non-empty string"):
        t.evaluate(eval_dataset={"": PAIRS[:2]})


def test_several_eval_files_from_the_config(tmp_path, tok):
    a, b = tmp_path / "first.jsonl", tmp_path / "second.jsonl.gz"
    a.write_text("".join(json.dumps(r) + "\n" for r in PAIRS[:2]))
    import gzip

    b.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in PAIRS[2:4]).encode()))
    t = DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path / "l", eval_file=[str(a), str(b)], max_steps=1),
                   train_dataset=PAIRS, processing_class=tok)
    assert list(t.eval_sets) == ["eval_first", "eval_second"]
    t.train()
    assert {"eval_first/loss", "eval_second/loss"} <= {k for r in records(tmp_path / "l" / "run") for k in r}
    t = DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path / "m", eval_file={"held": str(a)}),
                   train_dataset=PAIRS, processing_class=tok)
    assert list(t.eval_sets) == ["eval_held"]
    yaml_cfg = tmp_path / "run.yaml"
    yaml_cfg.write_text(f"output_dir: {tmp_path / 'y'}\neval_file:\n  held: {a}\n  other: {b}\n")
    from dpokit.config import build_config

    assert build_config(DPOConfig, yaml_cfg).eval_file == {"held": str(a), "other": str(b)}
    with pytest.raises(ConfigError, match="both named 'first'"):
        DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path / "n", eval_file=[str(a), str(a)]),
                   train_dataset=PAIRS, processing_class=tok)


def test_trl_attributes_and_tokenized_rows(tmp_path, tok):
    t = DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path, max_steps=1), train_dataset=PAIRS,
                   eval_dataset=PAIRS[:2], processing_class=tok)
    assert t.processing_class is tok and t.ref_model is not None  # the frozen copy of the starting policy
    row = t.train_dataset[0]
    # TRL 1.x's tokenized DPO columns
    assert set(t.train_dataset.column_names) == {"prompt_ids", "chosen_ids", "rejected_ids"}
    ex = t.train_examples[0]
    assert row["prompt_ids"] == ex.prompt_ids.tolist() and row["chosen_ids"] == ex.chosen_ids.tolist()
    assert len(t.eval_dataset) == 2
    t.train()
    assert t.lr_scheduler is t.scheduler and t.optimizer is not None
    sft = SFTTrainer(tiny_llama(vocab_size=32000), args={"output_dir": str(tmp_path / "sft"), "max_steps": 1},
                     train_dataset=[{"prompt": "Hi", "completion": " there."}], processing_class=tok)
    row, ex = sft.train_dataset[0], sft.train_examples[0]
    assert row["input_ids"] == ex.prompt_ids.tolist() + ex.completion_ids.tolist()
    assert row["completion_mask"] == [0] * len(ex.prompt_ids) + [1] * len(ex.completion_ids)


def test_tensorboard_tags_and_logging_dir_as_transformers(tmp_path, tok):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = tmp_path / "tb"
    t = DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path, report_to="tensorboard", logging_dir=str(logs),
                                                          save_steps=2),
                   train_dataset=PAIRS, eval_dataset=PAIRS[:2], processing_class=tok)
    out = t.train()
    events = EventAccumulator(str(logs))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/rewards/margins", "train/epoch", "eval/loss", "eval/rewards/accuracies"} <= tags
    # (an evaluation's epoch is tagged train/epoch too, as transformers' rewrite_logs tags it)
    epochs = {e.step: e.value for e in events.Scalars("train/epoch")}
    assert [epochs[s] for s in (1, 2, 3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    # Epoch is epochs completed everywhere: metrics.jsonl, TrainOutput.metrics, the checkpoints' trainer_state.json.
    assert [r["epoch"] for r in records(tmp_path / "run") if "loss" in r] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert out.metrics["epoch"] == 1.0
    info = json.loads((tmp_path / "run" / "checkpoint-3" / "trainer_state.json").read_text())
    assert (info["epoch"], info["num_train_epochs"]) == (1.0, 1)
    assert "checkpoint-3" in {p.name for p in (tmp_path / "run").iterdir()}  # the last step, as transformers saves it
