"""`dpokit sweep`: axes from key=v1,v2, one run per setting, the frontier table and plot."""

import json

import pytest
import yaml

from dpokit.cli import main
from dpokit.config import DPOConfig
from dpokit.errors import ConfigError
from dpokit.sweep import split_axes, typed_value


def positive(prompt, completion):
    return float(sum(w in ("wonderful", "happy", "great") for w in completion.split()))


def test_split_axes():
    axes, rest = split_axes(["beta=0.1,0.3", "loss_type=[sigmoid,bco_pair]", "max_steps=2", "--seed", "1"])
    assert axes == {"beta": ["0.1", "0.3"]}
    assert rest == ["loss_type=[sigmoid,bco_pair]", "max_steps=2", "--seed", "1"]
    with pytest.raises(ConfigError, match="nothing to sweep"):
        split_axes(["beta=0.1"])


def test_swept_values_keep_their_settings_types():
    """`beta=0.1,1 loss_type=sigmoid,ipo max_steps=2,4 bf16=false,true`: floats, strings, ints and booleans, as the
    config reads them; a key the config does not declare is read as YAML reads it."""
    axes, _ = split_axes(["beta=0.1,1", "loss_type=sigmoid,ipo", "max_steps=2,4", "bf16=false,true",
                          "dataset_num_proc=4,8"])
    typed = {k: [typed_value(DPOConfig, k, v) for v in values] for k, values in axes.items()}
    assert typed == {"beta": [0.1, 1.0], "loss_type": ["sigmoid", "ipo"], "max_steps": [2, 4], "bf16": [False, True],
                     "dataset_num_proc": [4, 8]}
    assert [type(v) for vs in typed.values() for v in vs] == [float, float, str, str, int, int, bool, bool, int, int]
    with pytest.raises(ConfigError, match="max_steps: expected an integer, got '2.5'"):
        typed_value(DPOConfig, "max_steps", "2.5")


def test_sweep_trains_each_setting_and_draws_the_frontier(tmp_path):
    from dpokit.demo import build_model, build_tokenizer

    tok = build_tokenizer()
    build_model(tok, 0).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    rows = [{"prompt": "one morning , the baker went to the market .", "chosen": " it was wonderful .",
             "rejected": " it was terrible ."}] * 4
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": rows[0]["prompt"]}) + "\n")
    cfg = tmp_path / "dpo.yaml"
    cfg.write_text(f"model_name_or_path: {tmp_path / 'base'}\ntrain_file: {tmp_path / 'prefs.jsonl'}\n"
                   f"output_dir: {tmp_path / 'sweep'}\nmax_steps: 2\nper_device_train_batch_size: 2\n"
                   "learning_rate: 1.0e-3\nsave_steps: 0\ndisable_tqdm: true\n")
    rc = main(["sweep", "--config", str(cfg), "--prompts", str(tmp_path / "prompts.jsonl"), "--judge",
               "test_sweep:positive", "--num_samples", "2", "--max_new_tokens", "6", "beta=0.1,1.0"])
    assert rc == 0
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [r["beta"] for r in summary["runs"]] == [0.1, 1.0] and summary["axes"] == {"beta": [0.1, 1.0]}
    for r in summary["runs"]:
        assert (tmp_path / "sweep" / f"beta={r['beta']}" / "model.safetensors").is_file()
        trial = yaml.safe_load((tmp_path / "sweep" / f"beta={r['beta']}" / "dpokit_config.yaml").read_text())
        assert trial["beta"] == r["beta"] and isinstance(trial["beta"], float) and trial["max_steps"] == 2
        assert r["kl"] == r["kl"] and r["reward"] == r["reward"]
    assert (tmp_path / "sweep" / "frontier.png").stat().st_size > 1000
    # Run again: refused before any training, with the key that allows it; with that key, it runs.
    argv = ["sweep", "--config", str(cfg), "--prompts", str(tmp_path / "prompts.jsonl"), "--judge",
            "test_sweep:positive", "--num_samples", "2", "--max_new_tokens", "6", "beta=0.1,1.0"]
    assert main(argv) == 2
    assert main(argv + ["overwrite_output_dir=true", "max_steps=1"]) == 0


def test_sweep_checks_every_setting_before_training(tmp_path):
    with pytest.raises(ConfigError, match="loss_type: unknown 'sigmod'"):
        from dpokit.sweep import run_sweep

        run_sweep(None, ["loss_type=sigmoid,sigmod", "train_file=x.jsonl"], prompts="p.jsonl", judge="implicit")


def test_sweep_refuses_unreadable_prompts_before_training(tmp_path, capsys):
    from conftest import refused

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')
    cfg = tmp_path / "dpo.yaml"
    cfg.write_text(f"model_name_or_path: {tmp_path / 'base'}\ntrain_file: {tmp_path / 'prefs.jsonl'}\n"
                   f"output_dir: {tmp_path / 'sweep'}\n")
    refused(capsys, ["sweep", "--config", cfg, "--prompts", prompts, "--judge", "implicit", "beta=0.1,1.0"],
            f"{prompts}:2: invalid UTF-8 (byte 0xe9 at column 16)", unchanged=[prompts, cfg])
    assert not (tmp_path / "sweep").exists()


def test_sweep_refuses_a_judge_that_cannot_work_before_training(tmp_path, capsys):
    from conftest import refused

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    cfg = tmp_path / "dpo.yaml"
    cfg.write_text(f"model_name_or_path: {tmp_path / 'base'}\ntrain_file: {tmp_path / 'prefs.jsonl'}\n"
                   f"output_dir: {tmp_path / 'sweep'}\n")
    refused(capsys, ["sweep", "--config", cfg, "--prompts", prompts, "--judge", "no_such_judge_module:score",
                     "beta=0.1,1.0"], "judge 'no_such_judge_module:score': cannot import module")
    refused(capsys, ["sweep", "--config", cfg, "--prompts", prompts, "--judge", "test_sweep:no_such_function",
                     "beta=0.1,1.0"], "has no function 'no_such_function'")
    refused(capsys, ["sweep", "--config", cfg, "--prompts", prompts, "--judge", f"rm:{tmp_path}", "beta=0.1,1.0"],
            "has no config.json")
    assert not (tmp_path / "sweep").exists()
