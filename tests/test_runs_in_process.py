"""Several runs in one Python process: trainers of different precision (bf16 / fp32, as transformers resets
accelerate's process-wide state for each run) and gradient accumulation, in either order, each giving the numbers it
gives when run first; a trainer made before another keeps its own precision."""

from __future__ import annotations

import json

from conftest import tiny_llama
from dpokit import DPOConfig, DPOTrainer

PAIRS = [
    {"prompt": "The weather today is", "chosen": " sunny and warm.", "rejected": " cold, grey and wet."},
    {"prompt": "My favourite food is", "chosen": " fresh bread.", "rejected": " nothing at all."},
]


def trainer(tmp_path, name, tok, bf16, accumulation):
    cfg = DPOConfig(output_dir=str(tmp_path / name), bf16=bf16, use_cpu=True, max_steps=2, logging_steps=1,
                    per_device_train_batch_size=2 // accumulation, gradient_accumulation_steps=accumulation,
                    disable_tqdm=True, learning_rate=1e-2, save_steps=0)
    return DPOTrainer(tiny_llama(vocab_size=32000), args=cfg, train_dataset=PAIRS, processing_class=tok)


def losses(t):
    t.train()
    return [r["loss"] for r in map(json.loads, (t.output_dir / "metrics.jsonl").read_text().splitlines())]


def test_bf16_and_fp32_runs_in_either_order_give_their_own_numbers(tmp_path, tok):
    fp32_first = losses(trainer(tmp_path, "a", tok, bf16=False, accumulation=2))
    bf16_after_fp32 = losses(trainer(tmp_path, "b", tok, bf16=True, accumulation=1))
    fp32_after_bf16 = losses(trainer(tmp_path, "c", tok, bf16=False, accumulation=2))
    bf16_after_both = losses(trainer(tmp_path, "d", tok, bf16=True, accumulation=1))
    assert fp32_after_bf16 == fp32_first
    assert bf16_after_both == bf16_after_fp32
    assert bf16_after_fp32 != fp32_first  # bf16 autocast really ran: its rounding shows in the losses
    # Two trainers alive at once: the one made first keeps its precision although the second replaced accelerate's.
    early = trainer(tmp_path, "e", tok, bf16=True, accumulation=1)
    late = trainer(tmp_path, "f", tok, bf16=False, accumulation=2)
    assert losses(early) == bf16_after_fp32
    assert losses(late) == fp32_first


def positive(prompt, completion):
    return float(sum(w in ("wonderful", "happy", "great") for w in completion.split()))


def test_a_sweep_over_bf16_runs_both_trials_in_one_process(tmp_path):
    import yaml

    from dpokit.cli import main
    from dpokit.demo import build_model, build_tokenizer

    tok = build_tokenizer()
    build_model(tok, 0).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    rows = [{"prompt": "one morning , the baker went to the market .", "chosen": " it was wonderful .",
             "rejected": " it was terrible ."}] * 2
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": rows[0]["prompt"]}) + "\n")
    cfg = tmp_path / "dpo.yaml"
    cfg.write_text(f"model_name_or_path: {tmp_path / 'base'}\ntrain_file: {tmp_path / 'prefs.jsonl'}\n"
                   f"output_dir: {tmp_path / 'sweep'}\nmax_steps: 1\nper_device_train_batch_size: 2\n"
                   "learning_rate: 1.0e-3\nsave_steps: 0\ndisable_tqdm: true\nuse_cpu: true\n")
    rc = main(["sweep", "--config", str(cfg), "--prompts", str(tmp_path / "prompts.jsonl"), "--judge",
               "test_runs_in_process:positive", "--num_samples", "1", "--max_new_tokens", "4", "bf16=false,true"])
    assert rc == 0
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [r["bf16"] for r in summary["runs"]] == [False, True]
    for r in summary["runs"]:
        trial = tmp_path / "sweep" / f"bf16={str(r['bf16']).lower()}"
        assert yaml.safe_load((trial / "dpokit_config.yaml").read_text())["bf16"] is r["bf16"]
