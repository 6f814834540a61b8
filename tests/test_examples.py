"""The tutorial scripts in examples/tutorial run as a user runs them: each a subprocess of its own (python SCRIPT
--output_dir out, from a scratch directory, dpokit from this checkout), exiting 0 with what it promises on stdout and
on disk. Two optimizer steps each keep the six within seconds."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HH_FILE

REPO = Path(__file__).resolve().parents[1]
TUTORIAL = REPO / "examples" / "tutorial"


def run_step(script: str, tmp_path: Path, *extra: str) -> tuple[str, Path]:
    """Run one tutorial script; returns its stdout+stderr and its output directory."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(TUTORIAL / script), "--output_dir", "out", "--max_steps", "2", *extra],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    return proc.stdout, tmp_path / "out"


def metric(stdout: str, title: str, key: str) -> float:
    """The value printed as `  key: value` under the `== title` heading."""
    section = stdout.split(f"== {title}\n", 1)[1]
    for line in section.splitlines():
        if line.startswith(f"  {key}: "):
            return float(line.split(": ", 1)[1])
        if line.startswith("=="):
            break
    raise AssertionError(f"no {key} under {title!r} in:\n{stdout}")


def test_01_basic(tmp_path):
    stdout, out = run_step("01_basic.py", tmp_path)
    assert 0 < metric(stdout, "training", "train_loss") < 1
    assert (out / "01_basic" / "model.safetensors").is_file() and (out / "01_basic" / "tokenizer.json").is_file()


def test_02_custom_dataset(tmp_path):
    stdout, out = run_step("02_custom_dataset.py", tmp_path, "--hh", str(HH_FILE), "--hh_rows", "8")
    # The CSV read with column_map and the same rows mapped in code are the same data: the same run.
    assert metric(stdout, "csv_column_map", "train_loss") == metric(stdout, "datasets_map", "train_loss")
    formats = {name: json.loads((out / f"02_{name}" / "data_report.json").read_text())["train"]["format"]
               for name in ("csv_column_map", "datasets_map", "conversational", "hh_transcripts")}
    assert formats == {"csv_column_map": "standard", "datasets_map": "standard", "conversational": "conversational",
                       "hh_transcripts": "implicit_hh"}


def test_03_lora(tmp_path):
    stdout, out = run_step("03_lora.py", tmp_path)
    assert "trainable parameters: 8192 of" in stdout
    assert (out / "03_lora" / "adapter_config.json").is_file()
    merged = out / "03_lora_merged"
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()


def test_04_custom_loss(tmp_path):
    stdout, out = run_step("04_custom_loss.py", tmp_path)
    assert "token_mean_hinge" in stdout.split("registered losses:", 1)[1].splitlines()[0]
    assert math.isfinite(metric(stdout, "token_mean_hinge", "token_mean_margin"))  # the loss's own metric is logged
    losses = {name: metric(stdout, name, "train_loss") for name in ("token_mean_hinge", "sigmoid", "ipo")}
    assert len(set(losses.values())) == 3, losses  # three different objectives on the same start
    assert all((out / f"04_{name}" / "metrics.jsonl").is_file() for name in losses)


def test_05_evaluation(tmp_path):
    stdout, out = run_step("05_evaluation.py", tmp_path)
    result = json.loads((out / "05_evaluation" / "eval.json").read_text())
    assert result["reference"] == "out/base" and result["pairs"]["num_pairs"] == 16
    assert metric(stdout, "against the reference: held-out pairs", "accuracy") == pytest.approx(
        result["pairs"]["accuracy"], abs=1e-4)
    assert metric(stdout, "against the reference: sampled completions", "win_rate") == pytest.approx(
        result["samples"]["win_rate"], abs=1e-4)
    assert result["samples"]["judge"] == "sentiment_judge:positive_words"
    assert "eval_loss" in stdout


def test_06_data_utilities(tmp_path):
    stdout, out = run_step("06_data_utilities.py", tmp_path)
    # check finds the malformed row and the duplicate (exit 1); every other command succeeds.
    assert stdout.count("(exit code 1)") == 1 and stdout.count("(exit code 0)") == 5, stdout
    lines = {name: len((out / name).read_text().splitlines())
             for name in ("raw.jsonl", "canonical.jsonl", "filtered.jsonl", "train.jsonl", "eval.jsonl",
                          "train_audited.jsonl", "audit.jsonl")}
    assert lines["raw.jsonl"] == 50 and lines["canonical.jsonl"] == 49 and lines["filtered.jsonl"] == 48
    assert lines["train.jsonl"] + lines["eval.jsonl"] == 48 and lines["audit.jsonl"] == lines["train.jsonl"]
    assert lines["train_audited.jsonl"] == lines["train.jsonl"] - 4
