"""Step 6, data utilities: check, convert, filter, split and audit preference data before (and after) training.

    python examples/tutorial/06_data_utilities.py --output_dir runs/tutorial

Each step is a `dpokit data ...` command, called here in Python as `dpokit.cli.main([...])` (the same arguments the
shell takes; it returns the exit code). The raw file has the faults real data has: a malformed row, an exact
duplicate and a few pairs with their labels swapped, which the audit of a trained model brings to the top.
"""

import json
import os

from _tiny import base_model_path, common_args, load_tokenizer, parse_args, preference_rows, show
from dpokit import DPOConfig, DPOTrainer
from dpokit.cli import main as dpokit
from dpokit.data import load_rows, preference_examples

args = parse_args(__doc__.splitlines()[0])
out = args.output_dir
os.makedirs(out, exist_ok=True)
base = base_model_path(args, load_tokenizer(args))  # a model directory, whose tokenizer the commands read too


def path(name):
    return os.path.join(out, name)


def run(*argv):
    print(f"\n$ dpokit {' '.join(argv)}")
    code = dpokit(list(argv))
    print(f"(exit code {code})")
    return code


# Raw data: the demo pairs, four of them with chosen and rejected swapped, one repeated, one with an empty answer.
rows, _ = preference_rows(num_train=48)
for row in rows[:4]:
    row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
rows += [dict(rows[10]), {"prompt": rows[11]["prompt"], "chosen": rows[11]["chosen"], "rejected": ""}]
with open(path("raw.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)

# The same validation in Python: what a trainer would read and what it would refuse.
examples, report = preference_examples(*load_rows(path("raw.jsonl")), on_bad_rows="skip")
print(f"Python: {len(examples)} pairs; {report.summary()}")

# check: exit 0 when clean, 1 when it finds problems (here: the malformed row and the duplicate).
run("data", "check", path("raw.jsonl"), "--tokenizer", base, "--max_length", "128")
# convert: canonical JSON Lines, the bad row skipped and counted.
run("data", "convert", path("raw.jsonl"), path("canonical.jsonl"))
# filter: drop exact duplicates and pairs that truncation would cut.
run("data", "filter", path("canonical.jsonl"), path("filtered.jsonl"), "--dedup", "--tokenizer", base,
    "--max_length", "128", "--drop_truncated")
# split: train and eval sets that share no prompt.
run("data", "split", path("filtered.jsonl"), "--eval_fraction", "0.2", "--seed", "0",
    "--train_out", path("train.jsonl"), "--eval_out", path("eval.jsonl"))

# Train on the split, then audit its training pairs: the pairs the model most doubts come first.
training_args = DPOConfig(output_dir=path("06_dpo"), beta=0.1, **{**common_args(args), "max_steps": 2 * args.max_steps})
trainer = DPOTrainer(model=base, args=training_args, train_dataset=path("train.jsonl"),
                     eval_dataset=path("eval.jsonl"))
trainer.train()
show("evaluation on the held-out split", trainer.evaluate())
run_dir = str(trainer.save_model())
run("data", "audit", path("train.jsonl"), "--model", run_dir, "--ref", base, "--output", path("audit.jsonl"),
    "--show", "4")
# filter --audit: drop the most suspect pairs (or have people re-label them first: `dpokit annotate`).
run("data", "filter", path("train.jsonl"), path("train_audited.jsonl"), "--audit", path("audit.jsonl"),
    "--drop_top", "4")
