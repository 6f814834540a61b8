"""A run's record describes the run: an in-memory model's path and the LoRA settings really applied are in
dpokit_config.yaml (so `dpokit eval RUN` finds the reference), and a finished run can be extended exactly."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import SHORT_PAIRS
from dpokit import DPOConfig, DPOTrainer
from dpokit.checkpoint import CheckpointError
from dpokit.evaluate import default_reference

PAIRS = SHORT_PAIRS


@pytest.fixture(scope="module")
def base(tiny_base_dir):
    return tiny_base_dir


def args(out, **kw):
    return DPOConfig(**{**dict(output_dir=str(out), per_device_train_batch_size=1, max_steps=2, logging_steps=1,
                               save_steps=0, disable_tqdm=True, learning_rate=1e-2, lr_scheduler_type="constant",
                               warmup_ratio=0.0), **kw})


def record(out):
    return yaml.safe_load((out / "dpokit_config.yaml").read_text())


def test_an_in_memory_model_s_path_is_recorded_and_eval_finds_the_reference(tmp_path, base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base)
    trainer = DPOTrainer(model=model, args=args(tmp_path / "run", max_steps=1), train_dataset=PAIRS,
                         processing_class=AutoTokenizer.from_pretrained(base))
    trainer.train()
    trainer.save_model()
    assert record(tmp_path / "run")["model_name_or_path"] == str(base.resolve())
    assert default_reference(tmp_path / "run") == str(base.resolve())


def test_the_lora_settings_of_peft_config_are_recorded_and_the_run_resumes(tmp_path, base):
    from peft import LoraConfig

    lora = LoraConfig(r=2, lora_alpha=8, lora_dropout=0.0, target_modules=["v_proj", "q_proj"],
                      task_type="CAUSAL_LM")
    out = tmp_path / "run"
    trainer = DPOTrainer(str(base), args=args(out, max_steps=2, save_steps=1), train_dataset=PAIRS,
                         peft_config=lora)
    trainer.train()
    trainer.save_model()
    saved = record(out)
    assert (saved["use_peft"], saved["lora_r"], saved["lora_alpha"], saved["lora_dropout"]) == (True, 2, 8, 0.0)
    assert saved["lora_target_modules"] == ["q_proj", "v_proj"]
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], sorted(adapter["target_modules"])) == (2, 8, ["q_proj", "v_proj"])
    assert default_reference(out) == str(base.resolve())  # the adapter's base: the adapter-off reference
    # The recorded settings are what a resume compares: the same peft_config resumes its own run.
    again = DPOTrainer(str(base), args=args(out, max_steps=2, save_steps=1, resume_from_checkpoint="latest"),
                       train_dataset=PAIRS, peft_config=lora)
    assert again.train().global_step == 2


def weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize("short, long", [({"max_steps": 2}, {"max_steps": 4}),
                                         ({"num_train_epochs": 1, "max_steps": -1},
                                          {"num_train_epochs": 2, "max_steps": -1})])
def test_extending_a_finished_run_equals_an_uninterrupted_longer_run(tmp_path, base, short, long):
    whole = DPOTrainer(str(base), args=args(tmp_path / "whole", **long), train_dataset=PAIRS)
    whole_out = whole.train()
    first = DPOTrainer(str(base), args=args(tmp_path / "ext", save_steps=1, **short), train_dataset=PAIRS)
    first.train()
    first.save_model()
    extended = DPOTrainer(str(base), args=args(tmp_path / "ext", save_steps=1, resume_from_checkpoint="latest",
                                               **long), train_dataset=PAIRS)
    out = extended.train()
    assert out.global_step == whole_out.global_step
    want, got = weights(whole), weights(extended)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert record(tmp_path / "ext")["max_steps"] == long["max_steps"]
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "ext" / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    wanted = [r["loss"] for r in map(json.loads, (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert losses == wanted


def test_resuming_with_fewer_steps_than_the_checkpoint_s_is_refused(tmp_path, base):
    DPOTrainer(str(base), args=args(tmp_path / "run", max_steps=3, save_steps=2), train_dataset=PAIRS).train()
    shorter = DPOTrainer(str(base), args=args(tmp_path / "run", max_steps=1, resume_from_checkpoint="latest"),
                         train_dataset=PAIRS)
    # The last step is checkpointed (as transformers does), so the newest checkpoint is step 3's.
    with pytest.raises(CheckpointError, match="at step 3, beyond this run's 1 steps"):
        shorter.train()
