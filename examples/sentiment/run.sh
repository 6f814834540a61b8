#!/usr/bin/env bash
# The command-line walk-through on a task of our own: SFT on mixed-sentiment story continuations, DPO towards the
# positive ones, then `dpokit eval` of the DPO model against the SFT model on held-out prompts (sampled, seeded).
#   bash examples/sentiment/run.sh [OUT_DIR]      (a few minutes on 2 CPU cores)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-runs/sentiment}"
python "$here/make_task.py" "$out"
dpokit sft model_name_or_path="$out/base" train_file="$out/sft.jsonl" output_dir="$out/sft" \
    num_train_epochs=8 learning_rate=5e-3 per_device_train_batch_size=32 max_length=64 logging_steps=25 \
    save_steps=0 overwrite_output_dir=true seed=0 disable_tqdm=true
dpokit dpo model_name_or_path="$out/sft" train_file="$out/prefs.jsonl" eval_file="$out/heldout_pairs.jsonl" \
    output_dir="$out/dpo" num_train_epochs=2 learning_rate=7e-5 per_device_train_batch_size=16 beta=1.0 \
    max_length=64 logging_steps=10 save_steps=0 overwrite_output_dir=true seed=0 disable_tqdm=true
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" dpokit eval --model "$out/dpo" --pairs "$out/heldout_pairs.jsonl" \
    --prompts "$out/heldout_prompts.jsonl" --judge judge:positive --num_samples 8 --max_new_tokens 32 --seed 0
