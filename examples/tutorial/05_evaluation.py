"""Step 5, evaluation: `trainer.evaluate()` on held-out pairs, then the trained model against its reference with
dpokit's evaluation (the Python side of `dpokit eval`): implicit-reward accuracy and margins on held-out pairs, and a
judge's win rate and the KL to the reference on completions sampled from both.

    python examples/tutorial/05_evaluation.py --output_dir runs/tutorial

The judge is a Python function `judge(prompt, completion) -> float`, named as `module:function`
(`sentiment_judge.py` beside this script: the demo's sentiment score, the share of positive words); `dpokit eval
--judge sentiment_judge:positive_words` takes the same name, and `rm:PATH` a reward model.
"""

import json
import os

from transformers import AutoModelForCausalLM, AutoTokenizer

from _tiny import base_model_path, common_args, load_tokenizer, parse_args, preference_rows, show
from dpokit import DPOConfig, DPOTrainer
from dpokit.evaluate import evaluate_model

args = parse_args(__doc__.splitlines()[0])
base = base_model_path(args, load_tokenizer(args))
model = AutoModelForCausalLM.from_pretrained(base)
tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or base)
train_rows, eval_rows = preference_rows(num_train=128, num_eval=16)

training_args = DPOConfig(output_dir=f"{args.output_dir}/05_evaluation", beta=0.1, **common_args(args))
trainer = DPOTrainer(model=model, args=training_args, train_dataset=train_rows, eval_dataset=eval_rows,
                     processing_class=tokenizer)
trainer.train()
show("trainer.evaluate()", trainer.evaluate())  # eval_loss, eval_rewards/accuracies, ... as TRL names them
run_dir = trainer.save_model()

# The held-out pairs as a file: `dpokit eval` reads pairs and prompts from files (here the prompts are the pairs'
# distinct prompts).
heldout = os.path.join(args.output_dir, "heldout_pairs.jsonl")
with open(heldout, "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in eval_rows)

result = evaluate_model(run_dir, ref_path=base, pairs=heldout, prompts=heldout, judge="sentiment_judge:positive_words",
                        num_samples=2, max_new_tokens=24, seed=0)
pairs, samples = result["pairs"], result["samples"]
show("against the reference: held-out pairs", {k: pairs[k] for k in ("accuracy", "margin", "chosen_reward",
                                                                      "rejected_reward", "num_pairs")})
show("against the reference: sampled completions", {k: samples[k] for k in (
    "win_rate", "win_rate_se", "policy_score", "reference_score", "kl", "kl_se", "num_prompts")})
print("an example:", json.dumps(samples["examples"][0]))
print(f"eval.json and eval.md written to {result['written_to']}")
