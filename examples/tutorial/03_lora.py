"""Step 3, LoRA: train an adapter with `peft_config=`, save it, and export a merged full model.

    python examples/tutorial/03_lora.py --output_dir runs/tutorial

Only the adapter's weights train; the reference is the base model itself (the adapter switched off), so no second
copy of the model is held. The saved run is a peft adapter directory; `dpokit.export.merge_adapter` (the Python side
of `dpokit export RUN OUT --merge`) folds it into the base weights as a model plain transformers loads.
"""

from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from _tiny import base_model_path, common_args, load_tokenizer, parse_args, preference_rows, show
from dpokit import DPOConfig, DPOTrainer
from dpokit.export import merge_adapter

args = parse_args(__doc__.splitlines()[0])
base = base_model_path(args, load_tokenizer(args))  # the adapter records this path as its base model
model = AutoModelForCausalLM.from_pretrained(base)
tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or base)
train_rows, _ = preference_rows()

peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                         task_type="CAUSAL_LM")
training_args = DPOConfig(output_dir=f"{args.output_dir}/03_lora", beta=0.1,
                          **{**common_args(args), "learning_rate": 5e-3 if not args.model else 5e-5})
trainer = DPOTrainer(model=model, args=training_args, train_dataset=train_rows, processing_class=tokenizer,
                     peft_config=peft_config)
trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
total = sum(p.numel() for p in trainer.model.parameters())
print(f"trainable parameters: {trainable} of {total} ({100 * trainable / total:.2f}%)")
show("training", trainer.train().metrics)

adapter_dir = trainer.save_model()
print(f"adapter saved to {adapter_dir}")
merged_dir = merge_adapter(adapter_dir, f"{args.output_dir}/03_lora_merged", overwrite=True)
merged = AutoModelForCausalLM.from_pretrained(merged_dir)  # a plain transformers model: no peft needed to load it
print(f"merged model saved to {merged_dir} ({sum(p.numel() for p in merged.parameters())} parameters)")
