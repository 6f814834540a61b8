"""The model card: `save_model` writes README.md as TRL's trainers do, with what the run was; never over a user's."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import SHORT_PAIRS
from dpokit import DPOConfig, DPOTrainer, __version__
from dpokit.errors import ConfigError

PAIRS = SHORT_PAIRS


@pytest.fixture(scope="module")
def base(tiny_base_dir):
    return tiny_base_dir


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def card_of(directory):
    text = (directory / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def args(tmp_path, **kw):
    return DPOConfig(**{**dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=1, max_steps=2,
                               logging_steps=1, save_steps=0, disable_tqdm=True, learning_rate=1e-3, beta=0.25),
                        **kw})


def test_save_model_writes_a_card_with_the_base_model_data_loss_metrics_version_and_config(tmp_path, base):
    train = write_rows(tmp_path / "train.jsonl", PAIRS)
    evalf = write_rows(tmp_path / "eval.jsonl", PAIRS[:2])
    trainer = DPOTrainer(str(base), args=args(tmp_path, train_file=str(train), eval_file=str(evalf)))
    trainer.train()
    out = trainer.save_model()
    front, body = card_of(out)
    assert front["base_model"] == str(base.resolve())
    assert front["library_name"] == "transformers"
    assert {"generated_from_trainer", "trl", "dpo", "dpokit"} <= set(front["tags"])
    assert f"`{train}` | standard | 3 | 3 | 0 |" in body and f"`{evalf}` | standard | 2 | 2 | 0 |" in body
    assert '`loss_type`: `"sigmoid"`' in body and "| `beta` | `0.25` |" in body
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last_train = [r for r in records if "loss" in r][-1]
    last_eval = [r for r in records if "eval/loss" in r][-1]
    assert f"| `loss` | {last_train['loss']} |" in body and f"| `eval/loss` | {last_eval['eval/loss']} |" in body
    assert f"- dpokit: {__version__}" in body
    config = yaml.safe_load(body.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert config == yaml.safe_load((out / "dpokit_config.yaml").read_text())


def test_a_lora_card_replaces_peft_s_checkpoints_carry_it_and_export_refreshes_it(tmp_path, base):
    from dpokit import checkpoint as C
    from dpokit.export import merge_adapter

    trainer = DPOTrainer(str(base), args=args(tmp_path, use_peft=True, lora_r=4, save_steps=1), train_dataset=PAIRS)
    trainer.train()
    out = trainer.save_model()
    front, body = card_of(out)
    assert front["library_name"] == "peft" and "lora" in front["tags"]
    assert "- PEFT:" in body and "trained as a LoRA adapter" in body
    ckpt = out / "checkpoint-1"
    assert (ckpt / "README.md").is_file() and C.problem(ckpt) is None  # the manifest covers the card
    merged = merge_adapter(out, tmp_path / "merged")
    mfront, mbody = card_of(merged)
    assert mfront["library_name"] == "transformers" and "merged" in mfront["tags"] and "lora" not in mfront["tags"]
    assert mfront["base_model"] == str(base.resolve()) and "dpokit export --merge" in mbody
    assert "## Training data" in mbody  # the adapter's card, carried over


def test_the_card_never_replaces_a_users_readme(tmp_path, base):
    run = tmp_path / "run"
    run.mkdir()
    (run / "README.md").write_text("my notes\n")
    with pytest.raises(ConfigError, match="README.md was not written by dpokit"):
        DPOTrainer(str(base), args=args(tmp_path, overwrite_output_dir=True), train_dataset=PAIRS).train()
    assert (run / "README.md").read_text() == "my notes\n"
    trainer = DPOTrainer(str(base), args=args(tmp_path, output_dir=str(tmp_path / "run2"), max_steps=1),
                         train_dataset=PAIRS)
    trainer.train()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "README.md").write_text("mine\n")
    with pytest.raises(ConfigError, match="choose another output_dir"):
        trainer.save_model(str(elsewhere))
    assert sorted(p.name for p in elsewhere.iterdir()) == ["README.md"]
    assert (elsewhere / "README.md").read_text() == "mine\n"
    # A run directory's own card is replaced by the next save, and overwrite_output_dir removes it with the run.
    trainer.save_model()
    trainer.save_model()
    again = DPOTrainer(str(base), args=args(tmp_path, output_dir=str(tmp_path / "run2"), max_steps=1,
                                            overwrite_output_dir=True), train_dataset=PAIRS)
    again.train()
    assert not (tmp_path / "run2" / "README.md").exists()
