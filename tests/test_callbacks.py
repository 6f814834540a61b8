"""transformers' callbacks in dpokit's loop, written as a TRL user writes them: `TrainerCallback` objects get
transformers' events with its `TrainerState` / `TrainerControl`; flags they set are honoured; transformers'
`EarlyStoppingCallback` with `load_best_model_at_end`; the console prints what `on_log` receives."""

import ast
import json

import pytest
import torch
from transformers import EarlyStoppingCallback, TrainerCallback, TrainerControl, TrainerState

from conftest import EVEN_ODD_PAIRS, quick_dpo_config, tiny_llama
from dpokit import DPOTrainer
from dpokit.errors import ConfigError

PAIRS = EVEN_ODD_PAIRS
# The same questions with the preference reversed: as training learns PAIRS, the loss on these only rises.
REVERSED = [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in PAIRS]


cfg = quick_dpo_config


class Recorder(TrainerCallback):
    """Every event with the step and epoch the state showed then."""

    def __init__(self):
        self.events, self.logs, self.evaluated, self.saved = [], [], [], []

    def __getattribute__(self, name):
        attr = object.__getattribute__(self, name)
        if name.startswith("on_"):
            def record(args, state, control, **kwargs):
                self.events.append((name, state.global_step))
                self.args, self.state, self.control = args, state, control
                if name == "on_log":
                    self.logs.append(dict(kwargs["logs"]))
                if name == "on_evaluate":
                    self.evaluated.append((state.global_step, dict(kwargs["metrics"])))
                if name == "on_save":
                    self.saved.append(state.global_step)
                return attr(args, state, control, **kwargs)
            return record
        return attr


def test_callbacks_get_transformers_events_state_and_control(tmp_path, tok):
    rec = Recorder()
    t = DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path, eval_strategy="steps", eval_steps=2,
                                                          save_steps=2), train_dataset=PAIRS,
                   eval_dataset=PAIRS[:2], processing_class=tok, callbacks=[rec])
    assert rec.events == [("on_init_end", 0)]
    t.train()
    names = [e for e, _ in rec.events]
    # transformers' order: train begin, epoch begin, then per step begin/end with log, evaluate, save; epoch and
    # train end.
    assert names[:4] == ["on_init_end", "on_train_begin", "on_epoch_begin", "on_step_begin"]
    assert [s for e, s in rec.events if e == "on_step_end"] == [1, 2, 3]
    assert [s for e, s in rec.events if e == "on_evaluate"] == [2, 3]  # every eval_steps, and the last step
    assert rec.saved == [2, 3]  # every save_steps and, as transformers does, the last step
    assert names[-2:] == ["on_epoch_end", "on_train_end"] or names[-3:-1] == ["on_epoch_end", "on_log"]
    assert names.index("on_epoch_end") > names.index("on_save")
    assert isinstance(rec.state, TrainerState) and isinstance(rec.control, TrainerControl)
    assert rec.state is t.state and rec.args is t.args and rec.control is t.control
    s = t.state
    assert (s.global_step, s.max_steps, s.epoch, s.num_train_epochs) == (3, 3, 1.0, 1)
    assert s.log_history[-1]["step"] == 3 and "train_runtime" in s.log_history[-1]
    assert rec.evaluated[-1][1]["eval_loss"] == pytest.approx(s.log_history[-2]["eval_loss"], rel=1e-6)
    # The checkpoint's trainer_state.json records transformers' fields: epochs completed, the real num_train_epochs.
    info = json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text())
    assert (info["global_step"], info["epoch"], info["num_train_epochs"], info["max_steps"]) == (2, 2 / 3, 1, 3)


def test_on_log_gets_what_the_console_prints(tmp_path, tok, capsys):
    rec = Recorder()
    t = DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path, eval_strategy="steps", eval_steps=2),
                   train_dataset=PAIRS, eval_dataset=PAIRS[:2], processing_class=tok, callbacks=[rec])
    capsys.readouterr()
    t.train()
    printed = [ast.literal_eval(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [list(p) for p in printed] == [list(logs) for logs in rec.logs]  # same keys, same order
    assert len(printed) == 3 + 2 + 1  # 3 training logs, 2 evaluations, the summary
    train_log = printed[0]
    assert {"loss", "rewards/margins", "learning_rate", "grad_norm", "epoch"} <= set(train_log)
    assert train_log["epoch"] == f"{1 / 3:.4g}"  # transformers' PrinterCallback format: epochs completed
    assert "eval_loss" in printed[2] and "eval_rewards/accuracies" in printed[2]


def test_progress_bars_follow_disable_tqdm(tmp_path, tok, capsys):
    """With tqdm on, transformers' ProgressCallback draws the bars (training, evaluation, reference precomputation)
    and writes each log above them; disable_tqdm prints plain dicts and draws none."""
    t = DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path / "a", disable_tqdm=False, max_steps=2,
                                                          precompute_ref_log_probs=True),
                   train_dataset=PAIRS, eval_dataset=PAIRS[:2], processing_class=tok)
    t.train()
    out = capsys.readouterr()
    assert "reference log-probs" in out.err and "2/2" in out.err  # the precomputation's and the training bar
    assert "{'loss': " in out.out
    t = DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path / "b", max_steps=2),
                   train_dataset=PAIRS, eval_dataset=PAIRS[:2], processing_class=tok)
    capsys.readouterr()
    t.train()
    out = capsys.readouterr()
    assert "{'loss': " in out.out and "it/s]" not in out.err


def test_flags_a_callback_sets_are_honoured(tmp_path, tok):
    class Steer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                control.should_save = control.should_evaluate = True
            if state.global_step == 2:
                control.should_training_stop = True

    t = DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path, logging_steps=10, num_train_epochs=3),
                   train_dataset=PAIRS, eval_dataset=PAIRS[:2], processing_class=tok, callbacks=[Steer])
    out = t.train()
    assert out.global_step == 2 and t.state.global_step == 2
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "eval/loss" in r] == [1]
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-1"]
    # add / pop / remove, as transformers' Trainer has them
    rec = Recorder()
    t.add_callback(rec)
    assert t.pop_callback(Recorder) is rec and t.pop_callback(Recorder) is None
    t.remove_callback(Steer)  # the class given to the constructor
    assert not any(isinstance(cb, Steer) for cb in t.callback_handler.callbacks)
    t.add_callback(Steer)
    assert sum(isinstance(cb, Steer) for cb in t.callback_handler.callbacks) == 1


def early_stopping_oracle(eval_losses, patience):
    """transformers' EarlyStoppingCallback over these evaluations, with the best metric kept as transformers'
    `_determine_best_metric` keeps it: the step it stops at and the best step."""
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir="unused", eval_strategy="steps", save_strategy="steps",
                             load_best_model_at_end=True, report_to=[])
    cb, state, control = EarlyStoppingCallback(patience), TrainerState(), TrainerControl()
    for step, loss in eval_losses:
        state.global_step = step
        cb.on_evaluate(args, state, control, metrics={"eval_loss": loss})
        if state.best_metric is None or loss < state.best_metric:
            state.best_metric, state.best_global_step = loss, step
        if control.should_training_stop:
            return step, state.best_global_step
    return None, state.best_global_step


def test_early_stopping_and_the_best_model_at_end(tmp_path, tok):
    t = DPOTrainer(tiny_llama(vocab_size=32000),
                   args=cfg(tmp_path, eval_strategy="steps", eval_steps=1, save_steps=1, num_train_epochs=3,
                            load_best_model_at_end=True, learning_rate=1e-2),
                   train_dataset=PAIRS, eval_dataset=REVERSED[:2], processing_class=tok,
                   callbacks=[EarlyStoppingCallback(early_stopping_patience=2)])
    assert (t.args.metric_for_best_model, t.args.greater_is_better) == ("loss", False)  # transformers' defaults
    out = t.train()
    evals = [(r["step"], r["eval_loss"]) for r in t.state.log_history if "eval_loss" in r]
    stop, best = early_stopping_oracle(evals, patience=2)
    assert stop is not None and stop < 9 and out.global_step == stop  # stopped where transformers' logic stops
    assert t.state.best_model_checkpoint == str(tmp_path / "run" / f"checkpoint-{best}")
    assert t.state.best_metric == pytest.approx(min(loss for _, loss in evals))
    saved = t.save_model()
    from safetensors.torch import load_file

    final, best_weights = load_file(saved / "model.safetensors"), load_file(
        tmp_path / "run" / f"checkpoint-{best}" / "model.safetensors")
    assert final.keys() == best_weights.keys()
    for name in final:
        torch.testing.assert_close(final[name], best_weights[name], msg=name)
    last_weights = load_file(tmp_path / "run" / f"checkpoint-{stop}" / "model.safetensors")
    assert any(not torch.equal(final[n], last_weights[n]) for n in final)  # not simply the last step's model


def test_best_model_settings_are_checked_as_transformers_checks_them(tmp_path):
    with pytest.raises(ConfigError, match="eval and save strategies to match.*'no'.*'steps'"):
        cfg(tmp_path, load_best_model_at_end=True)
    with pytest.raises(ConfigError, match="save_steps to be a round multiple of eval_steps.*3.*2"):
        cfg(tmp_path, load_best_model_at_end=True, eval_strategy="steps", eval_steps=2, save_steps=3)
    c = cfg(tmp_path, load_best_model_at_end=True, eval_strategy="epoch", save_strategy="epoch",
            metric_for_best_model="rewards/accuracies")
    assert c.greater_is_better is True
    assert cfg(tmp_path, metric_for_best_model="eval_nll_loss").greater_is_better is False


def test_compute_metrics_is_refused_with_what_to_use(tmp_path, tok):
    with pytest.raises(ConfigError, match="compute_metrics is not supported: .*on_evaluate"):
        DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path), train_dataset=PAIRS, processing_class=tok,
                   compute_metrics=lambda p: {})
    with pytest.raises(ConfigError, match="callbacks: 3 is not a transformers.TrainerCallback"):
        DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path), train_dataset=PAIRS, processing_class=tok,
                   callbacks=[3])


def test_log_level_hides_routine_notices_never_the_metrics(tmp_path, tok, capsys):
    """As transformers: log_level passive (the default) is warning, so the count line of clean data (info) is not
    shown, while a count line with dropped rows is; the metrics dicts are printed at any level."""
    for level, shown in (("passive", False), ("info", True), ("error", False)):
        t = DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path / level, log_level=level, max_steps=1),
                       train_dataset=PAIRS, processing_class=tok)
        t.train()
        out = capsys.readouterr().out
        assert ("6 read, 6 kept" in out) is shown, level
        assert "{'loss': " in out
    long_prompt = {"prompt": "word " * 60, "chosen": " yes.", "rejected": " no."}
    DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path / "w", max_length=24),
               train_dataset=PAIRS + [long_prompt], processing_class=tok)
    assert "1 dropped by truncation" in capsys.readouterr().out
