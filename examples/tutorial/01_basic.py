"""Step 1, basic DPO: a model, its tokenizer, a preference dataset, `DPOConfig`, `DPOTrainer`, train, save.

    python examples/tutorial/01_basic.py --output_dir runs/tutorial

The same script as TRL's, with `from dpokit import ...` in place of `from trl import ...`. By default it trains the
tiny in-code model of `_tiny.py` on dpokit's demo pairs; `--model PATH` trains a real model instead.
"""

from datasets import Dataset

from _tiny import common_args, load_model, load_tokenizer, parse_args, preference_rows, show
from dpokit import DPOConfig, DPOTrainer

args = parse_args(__doc__.splitlines()[0])
tokenizer = load_tokenizer(args)
model = load_model(args, tokenizer)

# A preference dataset in TRL's standard format: one prompt, a chosen and a rejected completion per row.
train_rows, _ = preference_rows()
train_dataset = Dataset.from_list(train_rows)
print("a row:", train_rows[0])

training_args = DPOConfig(
    output_dir=f"{args.output_dir}/01_basic",
    beta=0.1,  # how far the policy may move from the reference (higher: closer)
    loss_type="sigmoid",  # the DPO paper's loss
    **common_args(args),
)
# ref_model=None: the reference is a frozen copy of `model` as it is now, as in TRL.
trainer = DPOTrainer(model=model, ref_model=None, args=training_args, train_dataset=train_dataset,
                     processing_class=tokenizer)
result = trainer.train()
show("training", result.metrics)

saved = trainer.save_model()
print(f"model saved to {saved}")
