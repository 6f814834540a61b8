"""transformers' callback machinery around dpokit's loop: `TrainerCallback` objects (`callbacks=[...]`,
`add_callback`) get the events they get from transformers' `Trainer`, with its `TrainerState` and `TrainerControl`,
through transformers' own `CallbackHandler`.

Why it is built this way:
- transformers' own classes, not copies: a callback written for transformers (`EarlyStoppingCallback`, a user's
  `on_log`) sees the objects and the event order it was written against, and the console shows what transformers
  prints (its `ProgressCallback`, or `PrinterCallback` with `disable_tqdm`).
- When to log, evaluate and save is still dpokit's `Intervals` (fractions of the run, the last step always logged):
  `Flow` sets the `control` flags from it where transformers' `DefaultFlowCallback` would, first in the list, so a
  later callback can set or clear any flag and the loop acts on the flags alone.
- The console, `on_log` and `state.log_history` use transformers' names (``eval_loss``); metrics.jsonl keeps dpokit's
  (``eval/loss``), which `dpokit report` reads.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from transformers import TrainerControl, TrainerState
from transformers.trainer_callback import (CallbackHandler, DefaultFlowCallback, ExportableState, PrinterCallback,
                                           ProgressCallback)

from dpokit.compat import transformers_names
from dpokit.errors import ConfigError


class Flow(DefaultFlowCallback):
    """dpokit's `Intervals` as the flags transformers' `DefaultFlowCallback` sets: the step strategies at each step's
    end, the epoch strategies at each epoch's end (also when the run stops inside an epoch, as transformers ends that
    epoch). The last step is evaluated when there is evaluation data (as transformers does under `eval_strategy:
    steps`; dpokit also without a strategy) and checkpointed under a save strategy, as transformers does."""

    def __init__(self):
        self.due, self.evaluates = None, False

    def on_step_end(self, args, state, control, **kwargs):
        due, step, last = self.due, state.global_step, state.global_step >= state.max_steps
        control.should_log |= due.log(step, False)
        control.should_evaluate |= self.evaluates and (
            due.evaluate(step, False) or (last and due.eval_strategy != "epoch"))
        control.should_save |= due.save(step, False)
        if last:
            control.should_training_stop = True
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        due, step, last = self.due, state.global_step, state.global_step >= state.max_steps
        # What an epoch's end adds to the step's own decisions (those were acted on already).
        control.should_log |= due.log(step, True) and not due.log(step, False)
        control.should_evaluate |= self.evaluates and (
            (due.evaluate(step, True) and not due.evaluate(step, False)) or (last and due.eval_strategy == "epoch"))
        control.should_save |= due.save(step, True) and not due.save(step, False)
        return control


class Events:
    """The callbacks of one trainer, its `TrainerState` and its `TrainerControl`."""

    def __init__(self, trainer, callbacks: Optional[list]):
        cfg, acc = trainer.args, trainer.accelerator
        self.trainer, self.flow = trainer, Flow()
        printer = PrinterCallback if cfg.disable_tqdm else ProgressCallback
        self.handler = CallbackHandler([self.flow, printer, *(callbacks or [])], trainer.model, trainer.tokenizer,
                                       None, None)
        self.state = TrainerState(is_local_process_zero=acc.is_local_main_process,
                                  is_world_process_zero=acc.is_main_process)
        self.control = TrainerControl()

    def __call__(self, event: str, **kwargs) -> TrainerControl:
        """Call `event` (e.g. "on_step_end") on every callback, in order; the control they return is kept."""
        self.control = getattr(self.handler, event)(self.trainer.args, self.state, self.control, **kwargs)
        return self.control

    def begin(self, due, total_steps: int, steps_per_epoch: int, evaluates: bool, history: list) -> None:
        """The state at the start of `train` (a resume included: `history` is the run's records so far)."""
        t, cfg, state = self.trainer, self.trainer.args, self.state
        self.flow.due, self.flow.evaluates = due, evaluates
        state.global_step, state.max_steps = t.global_step, total_steps
        state.epoch = t.schedule.epochs_completed(*t._position)
        # As transformers counts them: whole epochs the run takes, ceil(max_steps / steps per epoch).
        state.num_train_epochs = math.ceil(total_steps / steps_per_epoch)
        state.logging_steps, state.eval_steps, state.save_steps = due.log_every, due.eval_every, due.save_every
        state.train_batch_size = cfg.per_device_train_batch_size
        state.log_history = [transformers_names(r) for r in history]
        state.stateful_callbacks = {}
        for cb in self.handler.callbacks + [self.control]:
            if isinstance(cb, ExportableState):
                state.stateful_callbacks.setdefault(type(cb).__name__, cb.state())
        self.handler.model, self.handler.optimizer, self.handler.lr_scheduler = t.model, t.optimizer, t.scheduler

    def log(self, record: dict, to_file: bool = True, logs: Optional[dict] = None) -> dict:
        """Log a dpokit-named record (to metrics.jsonl, TensorBoard and W&B with `to_file`), and as transformers'
        `log` does: `epoch` added, appended to `state.log_history`, `on_log` with transformers' names (`logs`, by
        default `record` renamed), which is what the console prints. Returns those logs."""
        t, state = self.trainer, self.state
        if to_file and t._sink is not None:
            t._sink.write(state.global_step, {**record, "epoch": state.epoch})
        logs = {**(transformers_names(record) if logs is None else logs), "epoch": state.epoch}
        # As metrics.jsonl rounds them, so that a resumed run's history (read back from there) is the same.
        state.log_history.append({**{k: float(f"{v:.8g}") if isinstance(v, float) else v for k, v in logs.items()},
                                  "step": state.global_step})
        self("on_log", logs=dict(logs))
        return logs

    def act(self) -> Optional[dict]:
        """Act on the flags the callbacks set, as transformers' `_maybe_log_save_evaluate`: log, then evaluate, then
        save. Returns the training metrics logged, if any."""
        t, control, logged = self.trainer, self.control, None
        if control.should_log and t._meter.sums:  # nothing new to log if this step was logged already
            logged = t._log_training_metrics()
        control.should_log = False
        if control.should_evaluate:
            t._evaluate_sets()
        if control.should_save:
            self.saved(t._save_checkpoint())
        return logged

    def evaluate(self, sets: Optional[dict] = None, prefix: str = "eval", to_file: bool = True) -> dict:
        """Evaluate each set (split name -> examples; the trainer's by default), log its metrics and call
        `on_evaluate`, as transformers' `evaluate` does; a dict of sets gives `eval_<name>_*` metrics. The trainer's
        own sets then update the best metric. Returns the metrics with transformers' names."""
        t, merged = self.trainer, {}
        for split, examples in (t.eval_sets if sets is None else sets).items():
            means = t._evaluate(examples, split)
            name = prefix + split[len("eval"):]  # "eval" or "eval_<name>"
            logs = self.log({f"{split}/{k}": v for k, v in means.items()}, to_file=to_file,
                            logs={f"{name}_{k}": v for k, v in means.items()})
            self("on_evaluate", metrics=logs)
            merged.update(logs)
        if sets is None:
            self.best_metric(merged)
        return merged

    def best_metric(self, metrics: dict) -> None:
        """transformers' `_determine_best_metric`: after an evaluation (its `on_evaluate` has run), a new best
        `metric_for_best_model` becomes `state.best_metric` at this step."""
        cfg, state = self.trainer.args, self.state
        if cfg.metric_for_best_model is None:
            return
        name = cfg.metric_for_best_model
        name = name if name.startswith("eval_") else f"eval_{name}"
        if name not in metrics:
            raise ConfigError(f"metric_for_best_model: {name!r} is not among the evaluation metrics "
                              f"({', '.join(sorted(metrics))})")
        value, best = metrics[name], state.best_metric
        if best is None or (value > best if cfg.greater_is_better else value < best):
            state.best_metric, state.best_global_step = value, state.global_step

    def saved(self, ckpt: Path) -> None:
        """After checkpoint-N is written: the best checkpoint is the one of the best evaluation's step, if saved."""
        state = self.state
        if state.best_global_step:
            best = ckpt.parent / f"checkpoint-{state.best_global_step}"
            if best.is_dir():
                state.best_model_checkpoint = str(best)
        self("on_save")

    def restore(self, info: dict) -> None:
        """The best metric of a resumed run, from its checkpoint."""
        for key in ("best_metric", "best_global_step", "best_model_checkpoint"):
            setattr(self.state, key, info.get(key))

    def checkpoint_info(self) -> dict:
        """The `TrainerState` fields a checkpoint's trainer_state.json holds beside dpokit's own (transformers'
        names: epoch as epochs completed, num_train_epochs, the best metric)."""
        s = self.state
        return {"epoch": s.epoch, "max_steps": s.max_steps, "num_train_epochs": s.num_train_epochs,
                "logging_steps": s.logging_steps, "eval_steps": s.eval_steps, "save_steps": s.save_steps,
                "train_batch_size": s.train_batch_size, "best_metric": s.best_metric,
                "best_global_step": s.best_global_step, "best_model_checkpoint": s.best_model_checkpoint,
                "log_history": s.log_history, "stateful_callbacks": s.stateful_callbacks}


def check_callbacks(callbacks) -> None:
    """Refuse, before anything loads, a callback that is not a transformers `TrainerCallback` (class or instance)."""
    from transformers import TrainerCallback

    for cb in callbacks or ():
        if not isinstance(cb, TrainerCallback) and not (isinstance(cb, type) and issubclass(cb, TrainerCallback)):
            raise ConfigError(f"callbacks: {cb!r} is not a transformers.TrainerCallback (class or instance)")


def load_best_model(trainer, state: TrainerState) -> None:
    """transformers' `load_best_model_at_end`: the weights of the best evaluation's checkpoint back into the policy,
    so that `save_model` writes them."""
    from dpokit.metrics import log

    log(f"loading the best model from {state.best_model_checkpoint} (score: {state.best_metric})")
    trainer.engine.load_weights(trainer.model, trainer.policy, Path(state.best_model_checkpoint), trainer.use_peft)


def progress(iterable, desc: str, cfg, main_process: bool):
    """A tqdm bar over `iterable` (work outside the loop, e.g. precomputing reference log-probs), on the main process
    unless `disable_tqdm`, as transformers' bars are."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, disable=cfg.disable_tqdm or not main_process, dynamic_ncols=True)
