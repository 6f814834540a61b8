"""A config made in Python is the config YAML makes: `DPOConfig(...)` / `SFTConfig(...)` take every key a YAML file
may hold (TRL's keys without a dpokit field, transformers' aliases), with the same one-line errors; a wrong-typed
value names its field; a key TRL removed says what replaced it; lists come from the command line as `a,b`."""

from __future__ import annotations

import dataclasses

import pytest

from dpokit import DPOConfig, SFTConfig
from dpokit.compat import ALIASES, ANY, FOREIGN_KEYS, REMOVED_KEYS
from dpokit.config import build_config, config_from_args, parse_overrides
from dpokit.errors import ConfigError


def _error(make) -> str:
    with pytest.raises(ConfigError) as info:
        make()
    return str(info.value)


@pytest.mark.parametrize("cls", [DPOConfig, SFTConfig])
def test_python_takes_every_trl_key_yaml_takes(cls):
    fields = {f.name for f in dataclasses.fields(cls)}
    for key, (default, reason) in FOREIGN_KEYS.items():
        if key in fields:
            continue
        value = 4 if default is ANY else default
        from_python = cls(**{key: value})
        from_yaml = build_config(cls, overrides={key: value})
        assert from_python.inert_keys == from_yaml.inert_keys == {key: reason}, key
    for alias, name in ALIASES.items():
        value = "bfloat16" if name == "dtype" else ({"use_reentrant": True} if name.endswith("kwargs") else
                                                     (True if name == "gradient_checkpointing" else "{{ x }}"))
        assert getattr(cls(**{alias: value}), name) == getattr(build_config(cls, overrides={alias: value}), name)
    # the keys of the issue, as a TRL script writes them
    cfg = DPOConfig(dataset_num_proc=4, torch_dtype="bfloat16", sync_ref_model=False, do_train=True)
    assert cfg.dtype == "bfloat16" and set(cfg.inert_keys) == {"dataset_num_proc", "sync_ref_model", "do_train"}
    assert SFTConfig(completion_only_loss=None).completion_only_loss is True  # TRL's "decide for me", as in YAML


def test_python_and_yaml_refuse_alike():
    cases = [{"learnin_rate": 1e-4}, {"lora_rank": 8}, {"generate_during_eval": True}, {"max_target_length": 128},
             {"push_to_hub": True}, {"torch_dtype": "float16", "dtype": "bfloat16"}, {"beta": -1.0}]
    for kwargs in cases:
        assert _error(lambda: DPOConfig(**kwargs)) == _error(lambda: build_config(DPOConfig, overrides=kwargs))
    assert "did you mean 'learning_rate'" in _error(lambda: DPOConfig(learnin_rate=1e-4))


@pytest.mark.parametrize("kwargs, message", [
    ({"loss_type": 3}, "loss_type: expected a string or a list, got 3"),
    ({"beta": "x"}, "beta: expected a number, got 'x'"),
    ({"beta": "0.1"}, "beta: expected float, got the string '0.1'"),
    ({"max_steps": 2.5}, "max_steps: expected an integer, got 2.5"),
    ({"output_dir": 3}, "output_dir: expected a string, got 3"),
    ({"use_peft": 1}, "use_peft: expected true or false, got 1"),
    ({"loss_weights": [1.0, "a"]}, "loss_weights[1]: expected a number, got 'a'"),
    ({"lora_target_modules": {"q": 1}}, "lora_target_modules: expected a string or a list or null, got {'q': 1}"),
    ({"model_init_kwargs": ["a"]}, "model_init_kwargs: expected a mapping, got ['a']"),
])
def test_a_wrong_typed_value_names_its_field(kwargs, message):
    assert _error(lambda: DPOConfig(**kwargs)) == message


def test_a_value_python_writes_differently_is_kept_as_yaml_reads_it(tmp_path):
    cfg = DPOConfig(output_dir=tmp_path / "run", beta=1, loss_type=("sigmoid", "sft"), loss_weights=(1, 0.5),
                    max_length=512.0, lora_target_modules="q_proj,v_proj")
    assert cfg.output_dir == str(tmp_path / "run") and isinstance(cfg.beta, float)
    assert cfg.loss_type == ["sigmoid", "sft"] and cfg.loss_weights == [1.0, 0.5] and cfg.max_length == 512
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    cfg = config_from_args(DPOConfig, cfg)  # resolved for a run, as the YAML path's config is
    cfg.save(tmp_path / "c.yaml")
    assert build_config(DPOConfig, tmp_path / "c.yaml").to_dict() == cfg.to_dict()


def test_keys_trl_removed_say_what_replaced_them(tmp_path):
    import trl

    trl_keys = {f.name for f in dataclasses.fields(trl.DPOConfig)} | {f.name for f in dataclasses.fields(trl.SFTConfig)}
    ours = {f.name for f in dataclasses.fields(DPOConfig)}
    for key, replacement in REMOVED_KEYS.items():
        assert key not in trl_keys and key not in ours and key not in FOREIGN_KEYS, key  # TRL 1.16 has it no more
        message = _error(lambda: DPOConfig(**{key: 1}))
        assert message == f"{key}: {replacement}" and "did you mean" not in message
    assert "use max_completion_length" in _error(lambda: build_config(DPOConfig, overrides={"max_target_length": 9}))
    recipe = tmp_path / "old.yaml"
    recipe.write_text("beta: 0.1\ngenerate_during_eval: true\n")
    assert _error(lambda: build_config(DPOConfig, recipe)).startswith(f"generate_during_eval in {recipe}: TRL removed")


def test_loss_lists_from_the_command_line(capsys):
    tokens = ["--loss_type", "sigmoid,sft", "--loss_weights", "1,0.5", "report_to=none"]
    cfg = build_config(DPOConfig, overrides=parse_overrides(tokens))
    assert cfg.loss_type == ["sigmoid", "sft"] and cfg.loss_weights == [1.0, 0.5]
    assert build_config(DPOConfig, overrides={"loss_type": "ipo"}).loss_type == "ipo"  # one name stays a name
    assert build_config(DPOConfig, overrides={"lora_target_modules": "q_proj,v_proj"}).lora_target_modules == [
        "q_proj", "v_proj"]
