"""Config: YAML + key=value overrides, coercion, validation in one place, documented fields."""

import dataclasses

import pytest

from dpokit.config import DPOConfig, SFTConfig, build_config, field_docs, parse_overrides
from dpokit.errors import ConfigError

TRL_NAMES = """output_dir per_device_train_batch_size per_device_eval_batch_size gradient_accumulation_steps learning_rate
lr_scheduler_type warmup_ratio warmup_steps weight_decay max_grad_norm num_train_epochs max_steps logging_steps eval_steps
save_steps save_total_limit seed bf16 fp16 gradient_checkpointing report_to beta loss_type label_smoothing max_length
max_prompt_length max_completion_length truncation_mode precompute_ref_log_probs reference_free rpo_alpha
disable_dropout model_init_kwargs model_name_or_path ref_model_name_or_path train_file eval_file use_peft lora_r
lora_alpha lora_dropout lora_target_modules""".split()


def test_every_trl_name_is_a_documented_field():
    names = {f.name for f in dataclasses.fields(DPOConfig)}
    docs = field_docs(DPOConfig)
    for name in TRL_NAMES:
        assert name in names, name
    for name in names:
        assert docs.get(name), f"field {name} has no docstring"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model_name_or_path: runs/sft\nlearning_rate: 1.0e-4\nbeta: 0.1\nloss_type: ipo\nmax_length: 512\n"
                    "lora_target_modules: [q_proj, v_proj]\n")
    cfg = build_config(DPOConfig, path, parse_overrides(["beta=0.3", "--max_length", "256", "--bf16",
                                                         "--eval_steps=5", "max_prompt_length=null"]))
    assert (cfg.learning_rate, cfg.beta, cfg.loss_type, cfg.max_length) == (1e-4, 0.3, "ipo", 256)
    assert cfg.bf16 is True and cfg.eval_steps == 5 and cfg.max_prompt_length is None
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]


def test_list_loss_type_and_weights():
    cfg = build_config(DPOConfig, overrides={"loss_type": "[sigmoid, bco_pair]", "loss_weights": "[0.8, 0.2]"})
    assert cfg.loss_type == ["sigmoid", "bco_pair"] and cfg.loss_weights == [0.8, 0.2]
    with pytest.raises(ConfigError, match="loss_weights has 1 values for 2"):
        build_config(DPOConfig, overrides={"loss_type": "[sigmoid, bco_pair]", "loss_weights": "[1.0]"})


@pytest.mark.parametrize("overrides, message", [
    ({"bf16": "maybe"}, "bf16: expected true or false"),
    ({"truncation_mode": "keep_middle"}, "truncation_mode: 'keep_middle' is not one of"),
    ({"bf16": "true", "fp16": "true"}, "bf16 and fp16 are both set"),
    ({"beta": "0"}, "beta must be > 0"),
    ({"lr_scheduler_type": "cosin"}, "did you mean 'cosine'"),
    ({"loss_type": "simpo", "precompute_ref_log_probs": "true"}, "uses no reference model"),
    ({"reference_free": "true", "precompute_ref_log_probs": "true"}, "uses no reference model"),
    ({"warmup_ratio": "2"}, "warmup_ratio must be in"),
    ({"report_to": "wandb"}, "report_to: unknown sink"),
])
def test_bad_values_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        build_config(DPOConfig, overrides=overrides)
    assert "\n" not in str(info.value)


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("beta: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml:.*invalid YAML"):
        build_config(DPOConfig, bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("lora_rank: 8\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'lora_rank' in .*typo.yaml \(did you mean 'lora_r'\?\)"):
        build_config(DPOConfig, typo)
    with pytest.raises(ConfigError, match="config file not found"):
        build_config(DPOConfig, tmp_path / "missing.yaml")


def test_sft_config_has_its_own_defaults():
    assert SFTConfig().learning_rate == 2e-5 and DPOConfig().learning_rate == 1e-6
    with pytest.raises(ConfigError, match="unknown config key 'beta'"):
        build_config(SFTConfig, overrides={"beta": "0.1"})
