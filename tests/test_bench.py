"""`dpokit bench` end to end, very small: the JSON schema, and dpokit and TRL agreeing on the first-step loss.

Runs the cpu-tiny model shape with 2 pairs per step and 1 warmup + 1 timed step per side (both sides are
subprocesses; about a minute on 2 cores). The speed figures of so short a run mean nothing; docs/performance.md has
the real cpu-tiny numbers.
"""

import json

import pytest

from conftest import HH_FILE, LLAMA2_TOKENIZER
from dpokit import bench
from dpokit.errors import ConfigError

KEYS = {"tokens_per_second", "pairs_per_second", "median_step_seconds", "peak_memory_bytes", "mfu", "first_step_loss"}


def test_bench_json_schema_and_first_step_loss_agree(tmp_path, capsys):
    pytest.importorskip("trl")
    out = tmp_path / "bench.json"
    code = bench.main(["--preset", "cpu-tiny", "--steps", "1", "--pairs-per-step", "2", "--trl-micro-batches", "2",
                       "--tokenizer", str(LLAMA2_TOKENIZER), "--data", str(HH_FILE), "--threads", "1",
                       "--output", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert {"dpokit", "trl"} <= result.keys()
    for side in ("dpokit", "trl"):
        r = result[side]
        assert KEYS <= r.keys(), side
        assert r["tokens_per_second"] > 0 and r["pairs_per_second"] > 0 and r["median_step_seconds"] > 0
        assert isinstance(r["peak_memory_bytes"], int) and r["peak_memory_bytes"] > 0
        assert r["mfu"] is None  # CPU: no agreed peak FLOP/s unless --peak-tflops is given
        assert len(r["step_losses"]) == 2
    d, t = result["dpokit"], result["trl"]
    # Same model, same pairs: the first step's loss (log 2: the policy starts as the reference) and policy log-probs
    # agree; the second step (after one identical AdamW update) agrees to float32 accuracy.
    assert d["first_step_loss"] == pytest.approx(t["first_step_loss"], abs=1e-5)
    assert d["first_step_chosen_logps"] == pytest.approx(t["first_step_chosen_logps"], rel=1e-4)
    assert d["step_losses"][1] == pytest.approx(t["step_losses"][1], abs=1e-4)
    printed = capsys.readouterr().out
    assert "tokens/s (non-padding)" in printed and "dpokit / TRL" in printed


def test_unknown_preset_is_refused():
    with pytest.raises(ConfigError, match="unknown preset"):
        bench.run("gpt-9")


def test_trl_liger_needs_a_gpu_preset_and_the_trl_side():
    with pytest.raises(ConfigError, match="--trl-liger needs a CUDA preset"):
        bench.run("cpu-tiny", trl_liger=True)
    with pytest.raises(ConfigError, match="--trl-liger needs a CUDA preset and the TRL side"):
        bench.run("llama-1b", trl_liger=True, skip_trl=True)


def test_trl_micro_batch_must_divide_the_step():
    with pytest.raises(ConfigError, match="do not divide"):
        bench.run("cpu-tiny", pairs_per_step=8, trl_micro_batches=[3])


def test_long_preset_runs_both_sides_on_synthetic_pairs_and_searches_lengths(tmp_path, monkeypatch):
    """The `long` machinery on a CPU-sized stand-in: synthetic pairs of a given length through both sides (same
    first-step loss), and the longest-sequence search (here bounded by `limit`, as a GPU run is by memory)."""
    pytest.importorskip("trl")
    import dataclasses

    tiny = dataclasses.replace(bench.PRESETS["long"], hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=2, vocab_size=512, precision="fp32",
                               device="cpu", steps=1, warmup_steps=1, synthetic_lengths=(64,), token_budget=256)
    monkeypatch.setitem(bench.PRESETS, "long-cpu", tiny)
    result = bench.run("long-cpu", threads=1, tokenizer=LLAMA2_TOKENIZER, log=lambda *_: None)
    r = result["lengths"]["64"]
    assert r["dpokit"]["first_step_loss"] == pytest.approx(r["trl"]["first_step_loss"], abs=1e-5)
    assert r["dpokit"]["tokens_per_second"] > 0 and "long-cpu" in result["preset"]["name"]
    assert "64 tokens per sequence" in bench.format_table(result)
    model_dir = tmp_path / "model"
    bench.build_model(tiny).save_pretrained(str(model_dir))
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(LLAMA2_TOKENIZER)).save_pretrained(str(model_dir))
    job = bench.Job(preset=dataclasses.asdict(tiny), model_dir=str(model_dir), pairs_file=str(tmp_path / "p.json"),
                    threads=1)
    assert bench._longest(job, tiny, "dpokit", tmp_path, lambda *_: None, start=32, limit=64) == 64


def test_trl_trials_per_side_and_out_of_memory_micro_batches(monkeypatch, tmp_path):
    """TRL+Liger runs its own micro-batch sizes; a size that runs out of memory is recorded and the others compared
    (another failure still ends the run)."""
    import dataclasses

    speeds = {("", 8): 10.0, ("", 16): "oom", ("liger", 16): 30.0, ("liger", 32): 20.0}

    def spawn(side, job, work, tag=""):
        if side == "dpokit":
            return {"tokens_per_second": 50.0}
        speed = speeds[(tag, job.trl_micro_batch)]
        if speed == "oom":
            raise RuntimeError("the trl worker failed (exit 1):\ntorch.OutOfMemoryError: CUDA out of memory.")
        return {"tokens_per_second": speed, "micro_batch": job.trl_micro_batch}

    monkeypatch.setattr(bench, "_spawn", spawn)
    p = dataclasses.replace(bench.PRESETS["llama-1b"], trl_micro_batches=(8, 16))
    base = bench.Job(preset={}, model_dir="", pairs_file="", threads=1,
                     extra={"trl_liger": True, "liger_micro_batches": [16, 32]})
    out = bench._both_sides(base, p, tmp_path, skip_trl=False, log=lambda msg: None)
    assert out["trl"]["micro_batch"] == 8 and out["trl_liger"]["micro_batch"] == 16
    assert out["trl"]["micro_batch_trials"] == [{"micro_batch": 8, "tokens_per_second": 10.0},
                                                {"micro_batch": 16, "tokens_per_second": None,
                                                 "error": "out of memory"}]
    assert [t["micro_batch"] for t in out["trl_liger"]["micro_batch_trials"]] == [16, 32]
    speeds[("", 8)] = "oom"
    with pytest.raises(RuntimeError, match="every micro-batch ran out of memory"):
        bench._both_sides(base, p, tmp_path, skip_trl=False, log=lambda msg: None)
    with pytest.raises(ConfigError, match="--trl-liger-micro-batches needs --trl-liger"):
        bench.run("llama-1b", trl_liger_micro_batches=[8])
