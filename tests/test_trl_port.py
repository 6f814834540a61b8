"""TRL / transformers settings with the same meaning in dpokit: evaluation, logging and save strategies, fractions
of the run, data seed, optimizer and scheduler arguments, the TRL scripts' data and model keys. (Their parsing is in
test_config.py; this file checks that the trainer does what each says.)"""

import json

import pytest
import torch

from conftest import LLAMA2_TOKENIZER, tiny_llama
from dpokit import DPOConfig, DPOTrainer
from dpokit.errors import ConfigError

PAIRS = [{"prompt": f"Question {i}: is {i} even?", "chosen": f" {'Yes' if i % 2 == 0 else 'No'}.",
          "rejected": f" {'No' if i % 2 == 0 else 'Yes'}, surely."} for i in range(6)]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(LLAMA2_TOKENIZER)


def cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, learning_rate=1e-3, max_steps=-1,
                num_train_epochs=2, logging_steps=1, save_steps=0, disable_tqdm=True, seed=0, per_device_eval_batch_size=4)
    base.update(kw)
    return DPOConfig(**base)


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train(tmp_path, tok, eval_dataset=None, **kw):
    t = DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path, **kw), train_dataset=PAIRS,
                   eval_dataset=eval_dataset, processing_class=tok)
    t.train()
    return t, records(tmp_path / "run")


def steps_of(recs, kind):
    key = "eval/loss" if kind == "eval" else "loss"
    return [r["step"] for r in recs if key in r]


def test_eval_logging_and_save_strategies(tmp_path, tok):
    # 6 pairs, 2 per step: 3 steps per epoch, 6 in all.
    _, recs = train(tmp_path / "a", tok, eval_dataset=PAIRS[:2], eval_strategy="epoch", logging_strategy="epoch",
                    save_strategy="epoch", eval_on_start=True)
    assert steps_of(recs, "train") == [3, 6] and steps_of(recs, "eval") == [0, 3, 6]
    # The last step is checkpointed too, as transformers does under a save strategy.
    assert sorted(p.name for p in (tmp_path / "a" / "run").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]

    # Fractions of the run, as transformers reads them; eval_steps defaults to logging_steps under "steps".
    _, recs = train(tmp_path / "b", tok, eval_dataset=PAIRS[:2], eval_strategy="steps", logging_steps=0.5,
                    logging_first_step=True, save_strategy="steps", save_steps=0.34)
    assert steps_of(recs, "train") == [1, 3, 6] and steps_of(recs, "eval") == [3, 6]
    assert sorted(p.name for p in (tmp_path / "b" / "run").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]

    # "no": the eval data is not even read, no checkpoints; the last step is still logged.
    t, recs = train(tmp_path / "c", tok, eval_dataset=PAIRS[:2], eval_strategy="no", logging_strategy="no",
                    save_strategy="no", save_steps=1)
    assert t.eval_examples is None and steps_of(recs, "train") == [6] and steps_of(recs, "eval") == []
    assert not list((tmp_path / "c" / "run").glob("checkpoint-*"))

    with pytest.raises(ConfigError, match="eval_strategy is 'steps' but there is no evaluation data"):
        DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path / "d", eval_strategy="steps"),
                   train_dataset=PAIRS, processing_class=tok)


def test_an_epoch_ends_with_a_short_step_as_in_transformers(tmp_path, tok):
    # 3 micro-batches per epoch, 2 per step: each epoch is a full step and a step of its last micro-batch
    # (ceil(3 / 2) = 2 steps per epoch, 4 in all); a step never mixes two epochs, as in transformers' Trainer.
    t, recs = train(tmp_path, tok, eval_dataset=PAIRS[:2], gradient_accumulation_steps=2, num_train_epochs=2,
                    eval_strategy="epoch", logging_steps=1)
    assert steps_of(recs, "eval") == [2, 4]
    # epoch is epochs completed, as transformers logs it: the fraction of the epoch's micro-batches consumed.
    assert [r["epoch"] for r in recs if "loss" in r] == pytest.approx([2 / 3, 1, 5 / 3, 2], rel=1e-6)


def test_data_seed_orders_the_data_and_nothing_else(tmp_path, tok):
    _, same = train(tmp_path / "a", tok, max_steps=3, num_train_epochs=1)
    _, explicit = train(tmp_path / "b", tok, max_steps=3, num_train_epochs=1, data_seed=0)
    _, other = train(tmp_path / "c", tok, max_steps=3, num_train_epochs=1, data_seed=5)
    assert [r["loss"] for r in same] == [r["loss"] for r in explicit]
    assert [r["loss"] for r in same] != [r["loss"] for r in other]


def test_optimizer_names_scheduler_kwargs_and_warmup_fraction(tmp_path, tok):
    a, recs_a = train(tmp_path / "a", tok, optim="adamw_torch")
    b, recs_b = train(tmp_path / "b", tok, optim="adamw_torch_fused")
    assert [r["loss"] for r in recs_a] == [r["loss"] for r in recs_b]  # on CPU both are the same AdamW

    _, recs = train(tmp_path / "c", tok, lr_scheduler_type="cosine_with_min_lr",
                    lr_scheduler_kwargs={"min_lr_rate": 0.5}, warmup_steps=0.34)
    lrs = [r["learning_rate"] for r in recs]
    # warmup: ceil(0.34 * 6) = 3 steps; then cosine from 1e-3 down to 0.5e-3 at the end.
    # The logged rate is the scheduler's after each step: warmup of ceil(0.34 * 6) = 3 steps, then a cosine that
    # ends at min_lr_rate x 1e-3 after the last step.
    assert lrs[:3] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3], rel=1e-4)
    assert lrs[-1] == pytest.approx(0.5e-3, rel=1e-4) and min(lrs[3:]) >= 0.5e-3 * (1 - 1e-4)
    with pytest.raises(ConfigError, match="lr_scheduler_kwargs .* for 'cosine_with_min_lr'"):
        train(tmp_path / "d", tok, lr_scheduler_type="cosine_with_min_lr")


def test_dataset_name_reads_the_named_splits(tmp_path, tok):
    import datasets

    source = tmp_path / "prefs"
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(PAIRS),
                          "test_prefs": datasets.Dataset.from_list(PAIRS[:3])}).save_to_disk(str(source))
    t, recs = train(tmp_path, tok, dataset_name=str(source), dataset_train_split="train_prefs",
                    dataset_test_split="test_prefs", eval_strategy="epoch")
    assert len(t.train_examples) == 6 and len(t.eval_examples) == 3 and steps_of(recs, "eval") == [3, 6]
    # Without an eval_strategy asking for it, the test split is not read (TRL's scripts do the same).
    t = DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path / "b", dataset_name=str(source),
                                                           dataset_train_split="train_prefs"), processing_class=tok)
    assert t.eval_examples is None
    one_file = tmp_path / "prefs.jsonl"
    one_file.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    with pytest.raises(ConfigError, match="is a single file \\(one split, the training data\\); set eval_file"):
        DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path / "d", dataset_name=str(one_file),
                                                           eval_strategy="steps"), processing_class=tok)
    from dpokit.errors import DataError

    with pytest.raises(DataError, match=r"no split 'train' \(splits: train_prefs, test_prefs\)"):
        DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path / "c", dataset_name=str(source)),
                   processing_class=tok)


def test_model_keys_dtype_attention_lora_extras_and_pad_token(tmp_path, tok):
    base = tmp_path / "base"
    tiny_llama(vocab_size=32000).save_pretrained(base)
    tok.save_pretrained(base)
    t = DPOTrainer(str(base), args=cfg(tmp_path / "a", dtype="bfloat16", attn_implementation="eager",
                                       pad_token="<unk>"), train_dataset=PAIRS)
    assert t.model.dtype == torch.bfloat16 and t.model.config._attn_implementation == "eager"
    assert t.tokenizer.pad_token == "<unk>"
    with pytest.raises(ConfigError, match="pad_token: '<nope>' is not a token"):
        DPOTrainer(str(base), args=cfg(tmp_path / "b", pad_token="<nope>"), train_dataset=PAIRS)
    t = DPOTrainer(str(base), args=cfg(tmp_path / "c", use_peft=True, lora_modules_to_save=["lm_head"],
                                       use_rslora=True, lora_r=4, lora_alpha=8), train_dataset=PAIRS)
    lora = t.model.peft_config["default"]
    assert lora.use_rslora and "lm_head" in lora.modules_to_save
    assert any("modules_to_save" in n and p.requires_grad for n, p in t.model.named_parameters())


def test_precompute_batch_size_gives_the_same_reference(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("DPOKIT_CACHE_DIR", str(tmp_path / "cache"))
    tables = []
    for size in (1, 5):
        t = DPOTrainer(tiny_llama(vocab_size=32000, seed=0), ref_model=tiny_llama(vocab_size=32000, seed=3),
                       args=cfg(tmp_path / str(size), precompute_ref_log_probs=True, precompute_ref_batch_size=size),
                       train_dataset=PAIRS, processing_class=tok)
        tables.append(t.reference["train"].table)
        monkeypatch.setenv("DPOKIT_CACHE_DIR", str(tmp_path / f"cache{size}"))  # no cache hit for the second
    torch.testing.assert_close(tables[0], tables[1], rtol=1e-5, atol=1e-5)


def test_run_name_labels_the_report_and_inert_keys_are_named(tmp_path, tok, capsys):
    from dpokit.config import build_config
    from dpokit.report import load_runs

    args = build_config(DPOConfig, overrides=dict(output_dir=str(tmp_path / "run"), max_steps=1, save_steps=0,
                                                  disable_tqdm=True, run_name="beta-0.1", dataloader_num_workers=8,
                                                  do_eval=True, per_device_train_batch_size=2))
    DPOTrainer(tiny_llama(vocab_size=32000), args=args, train_dataset=PAIRS, processing_class=tok).train()
    assert "TRL keys accepted that change nothing in dpokit: dataloader_num_workers, do_eval" in capsys.readouterr().out
    assert load_runs([tmp_path / "run"])[0].label == "beta-0.1"


def test_device_precision_and_logging_keys(tmp_path, tok, capsys):
    with pytest.raises(ConfigError, match="tf32 needs an Ampere or newer NVIDIA GPU"):
        DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path / "a", tf32=True), train_dataset=PAIRS,
                   processing_class=tok)
    with pytest.raises(ConfigError, match="use_cpu is set with fp16"):
        cfg(tmp_path, use_cpu=True, fp16=True).validate()
    t = DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path / "b", use_cpu=True, log_level="error",
                                                           max_steps=1), train_dataset=PAIRS, processing_class=tok)
    assert t.accelerator.device.type == "cpu"
    t.train()
    assert "[dpokit]" not in capsys.readouterr().out  # notices off at log_level error


def test_checkpointing_under_its_new_transformers_name(tmp_path, tok):
    from dpokit.config import build_config

    args = build_config(DPOConfig, overrides=dict(output_dir=str(tmp_path / "run"), activation_checkpointing=True,
                                                  activation_checkpointing_kwargs={"use_reentrant": False}))
    assert args.gradient_checkpointing and args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    with pytest.raises(ConfigError, match="activation_checkpointing .* and gradient_checkpointing .* disagree"):
        build_config(DPOConfig, overrides=dict(activation_checkpointing=True, gradient_checkpointing=False))
    # Same numbers with and without checkpointing.
    losses = []
    for name, extra in (("plain", {}), ("ckpt", {"gradient_checkpointing": True})):
        _, recs = train(tmp_path / name, tok, max_steps=2, **extra)
        losses.append([r["loss"] for r in recs])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_trainer_state_is_transformers_trainer_state(tmp_path, tok):
    from transformers import TrainerState

    t, recs = train(tmp_path, tok, eval_dataset=PAIRS[:2], eval_strategy="epoch")
    state = t.state
    assert isinstance(state, TrainerState)
    assert (state.global_step, state.max_steps, state.epoch) == (6, 6, 2.0)
    # Every record of metrics.jsonl with transformers' names, then the run's summary, as transformers logs it.
    assert state.log_history[:-1] == [{k.replace("eval/", "eval_"): v for k, v in r.items()} for r in recs]
    assert "eval_loss" in state.log_history[-2] and "eval/loss" in recs[-1]
    assert {"train_runtime", "train_loss", "epoch", "step"} <= set(state.log_history[-1])


def test_trl_trainer_keyword_arguments(tmp_path, tok):
    """TRL's trainer keywords: None (TRL's default) is accepted, anything else refused with what dpokit does instead."""
    from dpokit import SFTTrainer

    DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path / "a"), train_dataset=PAIRS, processing_class=tok,
               data_collator=None, callbacks=None, optimizers=(None, None), compute_metrics=None)
    with pytest.raises(ConfigError, match=r"callbacks: <object .*> is not a transformers.TrainerCallback"):
        DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path / "b"), train_dataset=PAIRS,
                   processing_class=tok, callbacks=[object()])
    with pytest.raises(ConfigError, match=r"SFTTrainer: formatting_func is not supported"):
        SFTTrainer(tiny_llama(vocab_size=32000), args={"output_dir": str(tmp_path / "c")},
                   train_dataset=[{"text": "hello"}], processing_class=tok, formatting_func=lambda r: r)
    with pytest.raises(TypeError, match="unexpected keyword argument 'train_data'"):
        DPOTrainer(tiny_llama(vocab_size=32000), train_data=PAIRS)


def test_ddp_keys_become_accelerate_handlers():
    from datetime import timedelta

    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    from dpokit.distributed import _handlers

    group, ddp = _handlers(DPOConfig(ddp_timeout=60, ddp_backend="gloo", ddp_find_unused_parameters=True,
                                     ddp_bucket_cap_mb=10))
    assert isinstance(group, InitProcessGroupKwargs) and (group.backend, group.timeout) == ("gloo", timedelta(seconds=60))
    assert isinstance(ddp, DistributedDataParallelKwargs) and ddp.find_unused_parameters and ddp.bucket_cap_mb == 10
    assert ddp.static_graph is False  # unset keys keep torch's defaults
    (only,) = _handlers(DPOConfig())
    assert only.to_kwargs() == {"timeout": timedelta(seconds=1800)}  # the backend stays accelerate's choice


def test_a_trl_config_object_trains(tmp_path, tok):
    """`args=trl.DPOConfig(...)` end to end: its `pad_token` (which `to_dict()` masks as "<PAD_TOKEN>") is read as
    set, None included."""
    trl = pytest.importorskip("trl")
    args = trl.DPOConfig(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=2, use_cpu=True,
                         bf16=False, report_to="none", gradient_checkpointing=False, logging_steps=1)
    t = DPOTrainer(tiny_llama(vocab_size=32000), args=args, train_dataset=PAIRS, processing_class=tok)
    assert t.args.pad_token is None and t.args.beta == 0.1
    assert t.train().global_step == 1
    args = trl.DPOConfig(output_dir=str(tmp_path / "run2"), pad_token="<unk>", use_cpu=True, bf16=False)
    t = DPOTrainer(tiny_llama(vocab_size=32000), args=args, train_dataset=PAIRS, processing_class=tok)
    assert t.args.pad_token == "<unk>" and t.tokenizer.pad_token == "<unk>"


def test_train_and_evaluate_return_what_transformers_returns(tmp_path, tok, capsys):
    from transformers.trainer_utils import TrainOutput

    t = DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path, max_steps=3, num_train_epochs=1, logging_steps=2,
                                                          warmup_steps=0, lr_scheduler_type="linear"),
                   train_dataset=PAIRS, eval_dataset=PAIRS[:2], processing_class=tok)
    out = t.train()
    recs = records(tmp_path / "run")
    assert isinstance(out, TrainOutput) and out.global_step == 3
    losses = [r["loss"] for r in recs if "loss" in r]  # means over steps 1-2, then step 3
    assert out.training_loss == pytest.approx((2 * losses[0] + losses[1]) / 3, rel=1e-6)
    assert out.metrics["train_loss"] == out.training_loss and out.metrics["loss"] == pytest.approx(losses[1])
    # The learning rate is the logging step's, as transformers logs it (linear decay from 1e-3 over 3 steps).
    assert [r["learning_rate"] for r in recs if "loss" in r] == pytest.approx([1e-3 / 3, 0.0], rel=1e-6, abs=1e-12)
    ev = t.evaluate()
    # transformers' evaluate() returns the logged metrics, its `epoch` included.
    assert set(ev) == {"eval_" + k[len("eval/"):] for k in recs[-1] if k.startswith("eval/")} | {"epoch"}
    assert ev["eval_loss"] == pytest.approx(recs[-1]["eval/loss"])
    assert "eval_loss" not in t.evaluate(ignore_keys=["loss"]) and "test_loss" in t.evaluate(metric_key_prefix="test")
    assert t.evaluate(eval_dataset=PAIRS[:2])["eval_loss"] == pytest.approx(ev["eval_loss"])
    # The script lines of TRL's examples: log_metrics, save_metrics, save_state.
    t.log_metrics("eval", ev)
    assert "***** eval metrics *****" in capsys.readouterr().out
    t.save_metrics("train", out.metrics)
    t.save_metrics("eval", ev)
    run = tmp_path / "run"
    assert json.loads((run / "all_results.json").read_text()) == {**out.metrics, **ev}
    t.save_state()
    assert json.loads((run / "trainer_state.json").read_text())["global_step"] == 3


def test_a_local_model_is_recorded_by_its_absolute_path(tmp_path, tok, monkeypatch):
    """The run directory names its starting model (dpokit eval's default reference) wherever it is read from."""
    import yaml

    tiny_llama(vocab_size=32000).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    t = DPOTrainer("base", args=cfg(tmp_path, max_steps=1), train_dataset=PAIRS)
    t.train()
    saved = yaml.safe_load((tmp_path / "run" / "dpokit_config.yaml").read_text())
    assert saved["model_name_or_path"] == str(tmp_path / "base")
    from dpokit.evaluate import default_reference

    monkeypatch.chdir("/")
    assert default_reference(tmp_path / "run") == str(tmp_path / "base")


def test_messages_rows_say_that_earlier_assistant_turns_are_context(tmp_path, capsys):
    from transformers import AutoTokenizer

    from dpokit import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(LLAMA2_TOKENIZER)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                          {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey."}]}]
    args = dict(output_dir=str(tmp_path / "run"), max_steps=1, disable_tqdm=True)
    SFTTrainer(tiny_llama(vocab_size=32000), args=SFTConfig(**args), train_dataset=rows, processing_class=tok)
    assert "1 train conversations have assistant turns before the final one" in capsys.readouterr().out
    SFTTrainer(tiny_llama(vocab_size=32000), args=SFTConfig(**args, completion_only_loss=False), train_dataset=rows,
               processing_class=tok)
    assert "assistant turns before the final one" not in capsys.readouterr().out


def test_eos_token_ends_every_completion(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(LLAMA2_TOKENIZER)  # changed in place, as TRL changes processing_class
    t = DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path, eos_token="<unk>", max_steps=1),
                   train_dataset=PAIRS, processing_class=tok)
    assert t.tokenizer.eos_token == "<unk>"
    assert all(p.chosen_ids[-1] == 0 and p.rejected_ids[-1] == 0 for p in t.train_examples)
    with pytest.raises(ConfigError, match="eos_token: '<eot>' is not a token of the tokenizer's vocabulary"):
        DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path, eos_token="<eot>"), train_dataset=PAIRS,
                   processing_class=tok)
