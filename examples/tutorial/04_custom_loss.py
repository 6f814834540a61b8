"""Step 4, a custom loss: register your own with `dpokit.losses.register`, train with it by name, and compare it with
built-in losses.

    python examples/tutorial/04_custom_loss.py --output_dir runs/tutorial

A registered loss is a function of the pairs' log-probs (`losses.Pairs`: policy and reference log-probs summed over
completion tokens, their log-ratios, the completion lengths when asked for) and the run's loss settings
(`losses.LossParams`: beta, ...), returning one loss per pair. Its name is then a `loss_type` like the built-in ones,
here trained beside `sigmoid` (the DPO paper's) and `ipo` from the same starting weights. The list of every built-in
loss, with its formula: docs/losses.md.
"""

import torch

from _tiny import common_args, load_model, load_tokenizer, parse_args, preference_rows, show
from dpokit import DPOConfig, DPOTrainer, losses


@losses.register("token_mean_hinge", needs_lengths=True)
def token_mean_hinge(pairs: losses.Pairs, params: losses.LossParams):
    """A hinge on the per-token mean log-ratios, so long and short completions weigh the same: the loss is 0 once the
    chosen completion's mean log-ratio beats the rejected one's by 1/beta."""
    chosen = pairs.chosen_logratios / pairs.chosen_lengths
    rejected = pairs.rejected_logratios / pairs.rejected_lengths
    margin = params.beta * (chosen - rejected)
    # Extra [B] metrics (detached) are logged beside the loss, averaged like the built-in ones.
    return torch.relu(1 - margin), {"token_mean_margin": margin.detach()}


args = parse_args(__doc__.splitlines()[0])
tokenizer = load_tokenizer(args)
train_rows, _ = preference_rows()
print("registered losses:", ", ".join(losses.LOSS_TYPES))

results = {}
for loss_type in ("token_mean_hinge", "sigmoid", "ipo"):
    training_args = DPOConfig(output_dir=f"{args.output_dir}/04_{loss_type}", beta=0.1, loss_type=loss_type,
                              **common_args(args))
    trainer = DPOTrainer(model=load_model(args, tokenizer), args=training_args, train_dataset=train_rows,
                         processing_class=tokenizer)
    metrics = trainer.train().metrics
    results[loss_type] = metrics
    show(loss_type, {k: v for k, v in metrics.items() if k.startswith(("train_loss", "rewards/", "token_mean"))})

print("\nloss_type          train_loss  rewards/accuracies  rewards/margins")
for loss_type, m in results.items():
    print(f"{loss_type:<18} {m['train_loss']:>10.4f}  {m['rewards/accuracies']:>18.4f}  {m['rewards/margins']:>15.4f}")
