"""The command line: SFT -> DPO -> export on a tiny model from files, --help, one-line errors with exit code 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import LLAMA2_TOKENIZER, tiny_llama
from dpokit.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("base")
    tiny_llama(vocab_size=32000).save_pretrained(d)
    AutoTokenizer.from_pretrained(LLAMA2_TOKENIZER).save_pretrained(d)
    return d


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


PAIRS = [{"prompt": f"Question {i}: is it good?", "chosen": " Yes, it is good.", "rejected": " No."} for i in range(6)]


def run_cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "dpokit", *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def test_sft_then_dpo_then_export_from_files(tmp_path, base_dir, capsys):
    sft_file = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]} for r in PAIRS])
    prefs = write_jsonl(tmp_path / "prefs.jsonl", PAIRS)
    common = ["max_steps=2", "logging_steps=1", "save_steps=1", "save_total_limit=1", "disable_tqdm=true",
              "per_device_train_batch_size=2"]
    assert main(["sft", f"model_name_or_path={base_dir}", f"train_file={sft_file}",
                 f"output_dir={tmp_path / 'sft'}", "learning_rate=1e-3", *common]) == 0
    cfg = tmp_path / "dpo.yaml"
    cfg.write_text(f"model_name_or_path: {tmp_path / 'sft'}\ntrain_file: {prefs}\neval_file: {prefs}\n"
                   f"output_dir: {tmp_path / 'dpo'}\nbeta: 0.1\nloss_type: sigmoid\nmax_length: 64\nuse_peft: true\n"
                   "lora_r: 4\nlearning_rate: 1.0e-3\n")
    assert main(["dpo", "--config", str(cfg), "--eval_steps", "1", *common]) == 0
    out = tmp_path / "dpo"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "dpokit_config.yaml",
                 "metrics.jsonl"):
        assert (out / name).is_file(), name
    # save_total_limit=1: the last step's checkpoint (written as transformers writes it under a save strategy)
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/rewards/accuracies" in r for r in records) and any("rewards/margins" in r for r in records)
    report = json.loads((out / "data_report.json").read_text())
    assert report["train"]["read"] == 6 and report["train"]["kept"] == 6 and report["train"]["dropped"] == 0
    # Evaluate the DPO run against its reference (the SFT model it started from) on held-out pairs.
    assert main(["eval", "--model", str(out), "--pairs", str(prefs), "--output_dir", str(tmp_path / "ev")]) == 0
    ev = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert ev["reference"] == str(tmp_path / "sft") and ev["pairs"]["num_pairs"] == 6
    # Export merges the adapter into a plain transformers model that loads and generates.
    assert main(["export", str(out), str(tmp_path / "merged"), "--merge"]) == 0
    # A second export into the same, now non-empty directory must not replace it unasked.
    capsys.readouterr()
    assert main(["export", str(out), str(tmp_path / "merged"), "--merge"]) == 2
    assert "already exists and is not empty; choose another output directory or pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(out), str(tmp_path / "merged"), "--merge", "--overwrite"]) == 0
    assert main(["export", str(tmp_path / "nope"), str(tmp_path / "m2"), "--merge"]) == 2
    assert "nope: no such run directory" in capsys.readouterr().err
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    gen = m.generate(**tok("Question 1: is it good?", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert gen.shape[1] > 0


def test_help_lists_every_field_with_its_doc(capsys):
    assert main(["dpo", "--help"]) == 0
    text = capsys.readouterr().out
    for key in ("beta (default: 0.1)", "precompute_ref_log_probs", "lora_target_modules", "Inverse temperature"):
        assert key in text


def test_user_mistakes_exit_2_with_one_line(tmp_path, base_dir):
    prefs = write_jsonl(tmp_path / "prefs.jsonl", PAIRS)
    cases = [
        (["dpo", "learnin_rate=1e-4", f"train_file={prefs}"], "did you mean 'learning_rate'"),
        (["dpo", f"model_name_or_path={tmp_path / 'nope'}", f"train_file={prefs}",
          f"output_dir={tmp_path / 'o'}"], "cannot load model"),
        (["dpo", f"model_name_or_path={base_dir}", f"train_file={tmp_path / 'missing.jsonl'}",
          f"output_dir={tmp_path / 'o2'}"], "missing.jsonl"),
        (["dpo", "--config", str(tmp_path / "none.yaml")], "config file not found"),
    ]
    for args, needle in cases:
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stderr[-2000:])
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and needle in lines[0], (args, r.stderr[-2000:])
        assert "Traceback" not in r.stderr


def test_python_dash_m_is_the_command():
    r = run_cli("--help")
    assert r.returncode == 0 and "dpo" in r.stdout and "demo" in r.stdout


def test_a_trl_recipe_runs_from_the_command_line(tmp_path, base_dir, capsys):
    """A TRL-script YAML (dataset_name with splits, eval_strategy, fractions, TrainingArguments-only keys) runs as
    written; a key dpokit cannot honour is a one-line error with exit code 2, before anything is written."""
    import datasets

    data = tmp_path / "prefs"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(PAIRS),
                          "test": datasets.Dataset.from_list(PAIRS[:2])}).save_to_disk(str(data))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""model_name_or_path: {base_dir}
dataset_name: {data}
output_dir: {tmp_path / 'out'}
do_eval: true
eval_strategy: steps
eval_steps: 0.5
logging_steps: 1
per_device_train_batch_size: 2
learning_rate: 1.0e-3
num_train_epochs: 1
optim: adamw_torch
lr_scheduler_type: cosine
warmup_steps: 0.1
save_strategy: "no"
gradient_checkpointing: true
gradient_checkpointing_kwargs: {{use_reentrant: false}}
remove_unused_columns: false
dataloader_num_workers: 2
report_to: none
disable_tqdm: true
""")
    assert main(["dpo", "--config", str(recipe)]) == 0
    recs = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "eval/loss" in r] == [2, 3]
    assert (tmp_path / "out" / "model.safetensors").is_file()
    r = run_cli("dpo", "--config", recipe, f"output_dir={tmp_path / 'out2'}", "push_to_hub=true")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "push_to_hub: 'true' is not supported" in r.stderr
    assert not (tmp_path / "out2").exists()
