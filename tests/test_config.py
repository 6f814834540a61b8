"""Config: YAML + key=value overrides, coercion, validation in one place, documented fields."""

import dataclasses
import re

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
    ({"report_to": "mlflow"}, "report_to: unknown sink"),
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


# ---------------------------------------------------------------------------------------------------------------------
# Porting a TRL config: every key of TRL's DPOConfig / SFTConfig (TrainingArguments included) and of its scripts'
# ModelConfig / ScriptArguments is either a dpokit field or listed in FOREIGN_KEYS, so none is "unknown".

def _trl_classes():
    trl = pytest.importorskip("trl")
    return trl


def test_every_key_of_trl_configs_is_a_field_or_a_listed_foreign_key():
    trl = _trl_classes()
    from dpokit.compat import ALIASES, FOREIGN_KEYS

    for ours, theirs in ((DPOConfig, (trl.DPOConfig, trl.ModelConfig, trl.ScriptArguments)),
                         (SFTConfig, (trl.SFTConfig, trl.ModelConfig, trl.ScriptArguments))):
        names = {f.name for f in dataclasses.fields(ours)}
        for cls in theirs:
            missing = [f.name for f in dataclasses.fields(cls)
                       if f.name not in names and f.name not in FOREIGN_KEYS and f.name not in ALIASES]
            assert not missing, (ours.__name__, cls.__name__, missing)
    for key, (default, reason) in FOREIGN_KEYS.items():
        assert reason and "\n" not in reason, key


def test_trl_defaults_port_unchanged():
    """Each TRL class's defaults, written out as a YAML, build a dpokit config; a foreign key at TRL's default asks
    for nothing dpokit does differently."""
    trl = _trl_classes()
    import yaml

    from dpokit.compat import FOREIGN_KEYS

    for ours, cls in ((DPOConfig, trl.ModelConfig), (DPOConfig, trl.ScriptArguments), (SFTConfig, trl.ModelConfig)):
        values = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                values[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                values[f.name] = f.default_factory()
        values = {k: v for k, v in values.items() if v is not None or k in FOREIGN_KEYS}
        build_config(ours, overrides=yaml.safe_load(yaml.safe_dump(values)))


def test_a_trl_recipe_yaml_ports_without_renames(tmp_path):
    """An alignment-handbook style recipe (TRL's scripts' keys, TrainingArguments' keys, v5 fractions)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("""
model_name_or_path: runs/sft
model_revision: main
dtype: bfloat16
attn_implementation: sdpa
dataset_name: data/prefs
dataset_train_split: train_prefs
dataset_test_split: test_prefs
dataset_num_proc: 12
bf16: true
beta: 0.01
do_eval: true
eval_strategy: steps
eval_steps: 100
gradient_accumulation_steps: 2
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: false
hub_model_id: zephyr-7b-dpo-full
learning_rate: 5.0e-7
log_level: info
logging_steps: 10
lr_scheduler_type: cosine
max_length: 1024
num_train_epochs: 1
optim: adamw_torch
output_dir: data/zephyr-7b-dpo-full
per_device_train_batch_size: 8
push_to_hub: false
remove_unused_columns: false
report_to: [tensorboard]
save_strategy: "steps"
save_steps: 0.25
save_total_limit: 1
seed: 42
warmup_steps: 0.1
use_peft: true
lora_r: 16
lora_alpha: 16
lora_modules_to_save: [lm_head]
use_rslora: true
""")
    cfg = build_config(DPOConfig, recipe)
    assert (cfg.dataset_name, cfg.dataset_train_split, cfg.dataset_test_split) == ("data/prefs", "train_prefs", "test_prefs")
    assert (cfg.dtype, cfg.attn_implementation, cfg.optim, cfg.eval_strategy) == ("bfloat16", "sdpa", "adamw_torch", "steps")
    assert cfg.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert cfg.save_steps == 0.25 and cfg.warmup_steps == 0.1 and cfg.eval_steps == 100
    assert cfg.lora_modules_to_save == ["lm_head"] and cfg.use_rslora
    assert set(cfg.inert_keys) == {"dataset_num_proc", "do_eval", "hub_model_id", "push_to_hub",
                                   "remove_unused_columns"}


@pytest.mark.parametrize("key, value, message", [
    ("push_to_hub", "true", r"push_to_hub: 'true' is not supported: dpokit does not upload"),
    ("use_liger_kernel", True, r"use_liger_kernel: True is not supported: dpokit does not use Liger"),
    ("sync_ref_model", "yes", r"sync_ref_model: 'yes' is not supported: TR-DPO"),
    ("load_in_8bit", True, r"load_in_8bit: True is not supported: quantized"),
    ("torch_dtype", "float64", r"dtype: 'float64' is not one of"),  # read as dtype, its v5 name
    ("deepspeed", "ds.json", r"deepspeed: 'ds.json' is not supported: the engine .* accelerate launch"),
    ("label_smoothing_factor", 0.1, r"label_smoothing_factor: 0.1 is not supported: .*label_smoothing \(cDPO\)"),
    ("dataloader_drop_last", True, r"dataloader_drop_last: True is not supported: every pair is trained on"),
    ("average_tokens_across_devices", "false", r"average_tokens_across_devices: 'false' is not supported"),
    ("optim", "adamw_8bit", r"optim: 'adamw_8bit' is not one of adamw_torch_fused, adamw_torch"),
    ("eval_strategy", "best", r"eval_strategy: 'best' is not one of steps, epoch, no"),
    ("save_strategy", "best", r"save_strategy: 'best' is not one of steps, epoch, no"),
    ("warmup_steps", 1.5, r"warmup_steps must be an integer >= 0 or a fraction of the run's steps in \(0, 1\)"),
    ("logging_steps", 0, r"logging_steps must be an integer >= 1 or a fraction"),
    ("dtype", "float64", r"dtype: 'float64' is not one of float32, bfloat16, float16, auto"),
])
def test_trl_keys_dpokit_cannot_honour_are_refused_with_the_reason(key, value, message):
    with pytest.raises(ConfigError, match=message):
        build_config(DPOConfig, overrides={key: value})


def test_a_trl_config_object_is_read_as_its_keys():
    """`args=trl.DPOConfig(...)`: dpokit fields take TRL's values (TRL's defaults included, e.g. gradient
    checkpointing on), other keys only when they differ from TRL's defaults."""
    trl = _trl_classes()
    from dpokit.config import config_from_args

    theirs = trl.DPOConfig(output_dir="out", learning_rate=5e-7, beta=0.3, eval_strategy="steps", eval_steps=0.2,
                           warmup_steps=0.1, dataloader_num_workers=4, use_cpu=True, bf16=False)
    cfg = config_from_args(DPOConfig, theirs)
    assert (cfg.output_dir, cfg.learning_rate, cfg.beta, cfg.eval_steps, cfg.warmup_steps) == ("out", 5e-7, 0.3, 0.2, 0.1)
    assert cfg.gradient_checkpointing and cfg.use_cpu and cfg.loss_type == ["sigmoid"]
    assert set(cfg.inert_keys) == {"dataloader_num_workers", "do_eval"}
    with pytest.raises(ConfigError, match="use_liger_kernel: True is not supported"):
        config_from_args(DPOConfig, trl.DPOConfig(output_dir="o", use_liger_kernel=True, use_cpu=True, bf16=False))
    sft = config_from_args(SFTConfig, trl.SFTConfig(output_dir="o", use_cpu=True, bf16=False))
    assert sft.completion_only_loss and sft.learning_rate == 2e-5


def test_null_is_trls_decide_for_me():
    cfg = build_config(SFTConfig, overrides={"completion_only_loss": None, "bf16": "null"})
    assert cfg.completion_only_loss is True  # TRL's choice for prompt/completion data, dpokit's default
    import torch

    assert cfg.bf16 is (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    assert build_config(DPOConfig, overrides={"bf16": None, "fp16": "true"}).bf16 is False


def test_step_intervals_may_be_fractions_of_the_run():
    from dpokit.config import steps_from

    assert steps_from(0.1, 95) == 10 and steps_from(0.25, 4) == 1 and steps_from(10, 95) == 10
    assert steps_from(None, 10) is None and steps_from(0, 10) == 0
    cfg = build_config(DPOConfig, overrides={"logging_steps": "0.5", "eval_steps": "3", "warmup_steps": "0.05"})
    assert (cfg.logging_steps, cfg.eval_steps, cfg.warmup_steps) == (0.5, 3, 0.05)


@pytest.mark.parametrize("kw, match", [
    ({"beta": "0.1"}, "beta: expected float, got the string '0.1'"),
    ({"per_device_train_batch_size": "2"}, "per_device_train_batch_size: expected int, got the string '2'"),
    ({"use_peft": "yes"}, "use_peft: expected bool, got the string 'yes'"),
    ({"max_length": [512]}, "max_length: expected an integer"),
])
def test_a_config_made_in_python_with_a_wrong_type_names_the_field(kw, match):
    from dpokit.config import config_from_args

    with pytest.raises(ConfigError, match=re.escape(match)):
        config_from_args(DPOConfig, DPOConfig(**kw))
    assert config_from_args(DPOConfig, DPOConfig(beta=1, loss_type="ipo")).beta == 1


def test_a_config_directory_is_named_as_one(tmp_path):
    with pytest.raises(ConfigError, match="is a directory; give the YAML file in it"):
        build_config(DPOConfig, tmp_path)


def test_a_key_given_twice_in_yaml_is_refused(tmp_path):
    f = tmp_path / "dpo.yaml"
    f.write_text("beta: 0.1\nlearning_rate: 1.0e-4\nbeta: 0.3\n")
    with pytest.raises(ConfigError, match=re.escape("dpo.yaml:3: invalid YAML (key 'beta' appears twice (lines 1 and 3))")):
        build_config(DPOConfig, f)
    f.write_text("beta: 0.1\nlora_target_modules: [q_proj, k_proj]\nmodel_init_kwargs: {a: 1}\n")
    assert build_config(DPOConfig, f).model_init_kwargs == {"a": 1}


def test_older_and_script_names_are_read_as_dpokit_keys(tmp_path):
    tpl = tmp_path / "chat.jinja"
    tpl.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    cfg = build_config(SFTConfig, overrides={"torch_dtype": "bfloat16", "chat_template_path": str(tpl),
                                             "eos_token": "<|im_end|>"})
    assert (cfg.dtype, cfg.chat_template, cfg.eos_token) == ("bfloat16", str(tpl), "<|im_end|>")
    with pytest.raises(ConfigError, match="torch_dtype .* and dtype .* disagree"):
        build_config(SFTConfig, overrides={"torch_dtype": "bfloat16", "dtype": "float32"})


def test_bf16_left_unset_takes_trls_decision(monkeypatch):
    """TRL's DPOConfig turns bf16 on when it is not set (unless fp16): so does dpokit, where the GPU has bf16."""
    import torch

    assert build_config(DPOConfig).bf16 is (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert build_config(DPOConfig).bf16 is True and DPOConfig().bf16 is None
    assert build_config(DPOConfig, overrides={"fp16": True}).bf16 is False
    assert build_config(DPOConfig, overrides={"use_cpu": True}).bf16 is False
    assert build_config(DPOConfig, overrides={"bf16": False}).bf16 is False


# ---------------------------------------------------------------------------------------------------------------------
# Every setting is checked once, when the config is made, against the range or choices declared with it.

@pytest.mark.parametrize("key, value, message", [
    ("learning_rate", "nan", "learning_rate must be a finite number in [0, 1] (got nan)"),
    ("learning_rate", "1e38", "learning_rate must be in [0, 1] (got 1e+38)"),
    ("num_train_epochs", "nan", "num_train_epochs must be a finite number >= 0 (got nan)"),
    ("num_train_epochs", "inf", "num_train_epochs must be a finite number >= 0 (got inf)"),
    ("beta", "inf", "beta must be a finite number > 0 (got inf)"),
    ("beta", "-1", "beta must be > 0 (got -1.0)"),
    ("adam_beta1", "1.5", "adam_beta1 must be in [0, 1) (got 1.5)"),
    ("adam_beta2", "1", "adam_beta2 must be in [0, 1) (got 1.0)"),
    ("adam_epsilon", "-1", "adam_epsilon must be > 0 (got -1.0)"),
    ("weight_decay", "-1", "weight_decay must be >= 0 (got -1.0)"),
    ("max_grad_norm", "-1", "max_grad_norm must be >= 0 (got -1.0)"),
    ("seed", "-1", "seed must be in [0, 4294967295] (got -1)"),
    ("data_seed", "4294967296", "data_seed must be in [0, 4294967295] or null (got 4294967296)"),
    ("loss_weights", "[a, b]", "loss_weights[0]: expected a number, got 'a'"),
    ("loss_weights", "[1, .nan]", "loss_weights[1] must be a finite number >= 0 (got nan)"),
    ("label_smoothing", "0.6", "label_smoothing must be in [0, 0.5] (got 0.6)"),
    ("ld_alpha", "1.5", "ld_alpha must be in [0, 1] or null (got 1.5)"),
    ("rpo_alpha", "-0.5", "rpo_alpha must be >= 0 or null (got -0.5)"),
    ("simpo_gamma", "inf", "simpo_gamma must be a finite number (got inf)"),
    ("f_alpha_divergence_coef", "nan", "f_alpha_divergence_coef must be a finite number (got nan)"),
    ("warmup_ratio", "nan", "warmup_ratio must be a finite number in [0, 1] (got nan)"),
    ("save_steps", "inf", "save_steps must be an integer >= 0 or a fraction of the run's steps in (0, 1) (got inf)"),
    ("lora_dropout", "1", "lora_dropout must be in [0, 1) (got 1.0)"),
    ("lora_r", "0", "lora_r must be >= 1 (got 0)"),
    ("min_score_gap", "-1", "min_score_gap must be >= 0 (got -1.0)"),
    ("max_nonfinite_steps", "-1", "max_nonfinite_steps must be >= 0 (got -1)"),
    ("precompute_ref_batch_size", "0", "precompute_ref_batch_size must be >= 1 or null (got 0)"),
    ("pair_strategy", "best", "pair_strategy: 'best' is not one of best_vs_worst, best_vs_rest, all_pairs"),
    ("f_divergence_type", "kl", "f_divergence_type: 'kl' is not one of reverse_kl, forward_kl"),
])
def test_numeric_settings_have_declared_ranges(key, value, message):
    from dpokit.settings import coerce as _coerce

    with pytest.raises(ConfigError) as info:
        build_config(DPOConfig, overrides={key: value})
    assert message in str(info.value) and "\n" not in str(info.value)
    # The same value given in Python is refused when the config is made, with the same words.
    field = {f.name: f for f in dataclasses.fields(DPOConfig)}[key]
    try:
        value = _coerce(key, value, field.type)
    except ConfigError:
        value = value.strip("[]").split(", ")  # loss_weights [a, b]: the strings themselves
    with pytest.raises(ConfigError, match=re.escape(message.split(" (got")[0])):
        DPOConfig(**{key: value})


def test_a_yaml_key_that_is_not_a_name_is_refused(tmp_path):
    f = tmp_path / "dpo.yaml"
    f.write_text("beta: 0.1\n3: x\n")
    with pytest.raises(ConfigError, match=r"config key 3 in .*dpo.yaml is not a setting name"):
        build_config(DPOConfig, f)


def test_a_config_is_checked_once_however_it_is_handed_on(monkeypatch, tmp_path):
    """`dpokit dpo beta=0.2` builds the config (checked as it is made) and hands it to DPOTrainer, which hands it to
    the base trainer: no second check. A config changed by hand in between is checked again."""
    from dpokit import config as C
    from dpokit import settings

    calls = []
    check = settings.check_settings
    monkeypatch.setattr(settings, "check_settings", lambda obj: (calls.append(type(obj).__name__), check(obj))[1])
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    cfg = build_config(DPOConfig, overrides={"beta": "0.2", "model_name_or_path": str(model_dir)})
    assert C.config_from_args(DPOConfig, C.config_from_args(DPOConfig, cfg)) is cfg
    assert calls == ["DPOConfig"]
    assert cfg.bf16 is not None and cfg.model_name_or_path == str(model_dir.resolve())  # resolved for the run
    from dpokit import losses

    assert losses.build(cfg) is losses.build(cfg) and calls == ["DPOConfig"]
    cfg.beta = -1.0
    with pytest.raises(ConfigError, match="beta must be > 0"):
        C.config_from_args(DPOConfig, cfg)
    assert calls == ["DPOConfig", "DPOConfig"]


@pytest.mark.parametrize("setting, message", [
    ("ld_alpha=1.5", "ld_alpha must be in [0, 1] or null (got 1.5)"),
    ("loss_type=exo_pair", "loss_type 'exo_pair' needs label_smoothing > 0"),
    ("loss_type=robust label_smoothing=0.5", "loss_type 'robust' needs label_smoothing < 0.5"),
    ("label_smoothing=0.1 loss_type=hinge", "label_smoothing=0.1 has no effect on loss_type 'hinge'"),
    ("learning_rate=nan", "learning_rate must be a finite number in [0, 1] (got nan)"),
])
def test_every_setting_is_checked_before_a_model_loads(setting, message, tmp_path, monkeypatch, capsys):
    """`dpokit dpo` with a bad loss setting: one line, exit code 2, and no model or tokenizer file is read (the
    model directory holds files that would fail to load, and every from_pretrained fails the test)."""
    import transformers

    from dpokit.cli import main

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        (model_dir / name).write_text("not a model file")

    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the settings were checked")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer, transformers.AutoConfig):
        monkeypatch.setattr(cls, "from_pretrained", refuse)
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text('{"prompt": "Q?", "chosen": " yes", "rejected": " no"}\n')
    argv = ["dpo", f"model_name_or_path={model_dir}", f"train_file={prefs}", f"output_dir={tmp_path / 'out'}",
            *setting.split()]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("dpokit dpo: error: ") and message in err[0], err


def test_the_configs_import_without_torch():
    """`import dpokit` and `dpokit --help` stay fast: the configs (loss settings included) need no torch; the losses
    are imported when a config is checked."""
    import subprocess
    import sys

    code = "import sys, dpokit.config; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0
