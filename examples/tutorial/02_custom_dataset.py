"""Step 2, your own data: map your columns and formats into what DPO trains on.

    python examples/tutorial/02_custom_dataset.py --output_dir runs/tutorial
    python examples/tutorial/02_custom_dataset.py --output_dir runs/tutorial \
        --hh ../shared/data/hh-rlhf-harmless-test.jsonl.gz --tokenizer ../shared/tokenizers/llama2

Three shapes of data, each trained on for a few steps:

1. A CSV file with your own column names (question/good/bad): `column_map` renames them to prompt/chosen/rejected;
   `datasets.Dataset.map` does the same in code, as in TRL.
2. Conversational rows (message lists), rendered by the tokenizer's chat template (`chat_template` sets one for a
   tokenizer that has none).
3. With `--hh FILE`: Anthropic HH-RLHF transcripts, whose prompt is implicit (the shared conversation up to the last
   "Assistant:" turn); dpokit detects the format. Real English needs a real tokenizer (`--tokenizer`): the default
   demo tokenizer only knows the demo's words.
"""

import csv
import gzip
import json
import os

from datasets import Dataset

from _tiny import common_args, load_model, load_tokenizer, parse_args, preference_rows, show
from dpokit import DPOConfig, DPOTrainer


def options(parser):
    parser.add_argument("--hh", default=None, help="an Anthropic HH-RLHF .jsonl(.gz) file; its first --hh_rows rows")
    parser.add_argument("--hh_rows", type=int, default=32)


args = parse_args(__doc__.splitlines()[0], options)
tokenizer = load_tokenizer(args)
rows, _ = preference_rows(num_train=32)


def train(name, train_dataset, **config):
    """A short DPO run on `train_dataset` from a fresh copy of the starting model; prints its final metrics."""
    training_args = DPOConfig(output_dir=f"{args.output_dir}/02_{name}", beta=0.1,
                               **{**common_args(args), **config})
    trainer = DPOTrainer(model=load_model(args, tokenizer), args=training_args, train_dataset=train_dataset,
                         processing_class=tokenizer)
    metrics = trainer.train().metrics
    show(name, {k: metrics[k] for k in ("train_loss", "rewards/accuracies", "rewards/margins")})


# 1. Your own column names, in a CSV file.
csv_path = f"{args.output_dir}/my_prefs.csv"
os.makedirs(args.output_dir, exist_ok=True)
with open(csv_path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=["question", "good", "bad"])
    writer.writeheader()
    writer.writerows({"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in rows)
# dpokit reads the file itself (CSV, JSONL, Parquet, ...) and renames the columns as it reads them...
train("csv_column_map", csv_path, column_map={"question": "prompt", "good": "chosen", "bad": "rejected"})
# ...or map the rows in code first, as a TRL script does (the same rows: the same numbers).
mapped = Dataset.from_csv(csv_path).map(
    lambda row: {"prompt": row["question"], "chosen": row["good"], "rejected": row["bad"]},
    remove_columns=["question", "good", "bad"])
train("datasets_map", mapped)

# 2. Conversational format: the prompt is a list of messages, chosen and rejected are the assistant's answer.
conversational = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                   "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
                   "rejected": [{"role": "assistant", "content": r["rejected"].strip()}]} for r in rows]
# A minimal template for a tokenizer without one (a chat model's tokenizer brings its own).
template = None if getattr(tokenizer, "chat_template", None) else (
    "{% for m in messages %}{{ m['content'] }} {% endfor %}")
train("conversational", Dataset.from_list(conversational), chat_template=template)

# 3. HH-RLHF transcripts: only "chosen" and "rejected", each a whole "\n\nHuman: ... \n\nAssistant: ..." text.
if args.hh:
    with gzip.open(args.hh, "rt") if args.hh.endswith(".gz") else open(args.hh) as f:
        hh_rows = [json.loads(line) for line, _ in zip(f, range(args.hh_rows))]
    train("hh_transcripts", hh_rows, max_length=256)
