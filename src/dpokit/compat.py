"""Compatibility with TRL and transformers: what code written against their trainers reaches for, with their names.

`TransformersTrainerAPI` gives dpokit's trainers transformers' `state` (a `TrainerState`), `evaluate()` with its
metric names (``eval_loss``), `log_metrics`, `save_metrics` and `save_state`. dpokit's own records (metrics.jsonl,
the report) keep dpokit's names (``eval/loss``).
"""

from __future__ import annotations

import json


def transformers_names(record: dict) -> dict:
    """A metrics record with transformers' names for evaluation metrics (``eval/loss`` -> ``eval_loss``)."""
    return {f"eval_{k[len('eval/'):]}" if k.startswith("eval/") else k: v for k, v in record.items()}


class TransformersTrainerAPI:
    """Mixed into `dpokit.trainer.Trainer`; reads its `args`, `schedule`, `global_step`, `accelerator`, `output_dir`
    and metrics sink."""

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """The training metrics on the trainer's `eval_dataset`, named as transformers' and TRL's `evaluate()` name
        them: ``eval_loss``, ``eval_rewards/chosen``, ... (`metric_key_prefix` + "_")."""
        from dpokit.errors import ConfigError

        if eval_dataset is not None:
            raise ConfigError("evaluate(eval_dataset=...): give the evaluation data to the trainer "
                              "(eval_dataset= or eval_file), so that it is checked and tokenized with the rest")
        ignored = set(ignore_keys or ())
        return {f"{metric_key_prefix}_{k[len('eval/'):]}": v for k, v in self._evaluate().items()
                if k[len("eval/"):] not in ignored}

    @property
    def state(self):
        """The run as transformers' `TrainerState` (global_step, max_steps, epoch, log_history: every record written
        to metrics.jsonl), for code written against TRL's and transformers' trainers (`trainer.state.log_history`)."""
        from transformers import TrainerState

        schedule = self.schedule
        total, per_epoch = (schedule.total_steps(), schedule.steps_per_epoch()) if schedule is not None else (0, 0)
        sink = self._sink
        args = self.args
        return TrainerState(global_step=self.global_step, max_steps=total,
                            epoch=self.global_step / per_epoch if per_epoch else 0.0,
                            log_history=[transformers_names(r) for r in sink.history] if sink is not None else [],
                            logging_steps=args.logging_steps, save_steps=args.save_steps, eval_steps=args.eval_steps,
                            train_batch_size=args.per_device_train_batch_size)

    def log_metrics(self, split: str, metrics: dict) -> None:
        """Print `metrics` as transformers' `Trainer.log_metrics` does (main process only)."""
        if not self.accelerator.is_main_process:
            return
        print(f"***** {split} metrics *****")
        width = max((len(k) for k in metrics), default=0)
        for key in sorted(metrics):
            print(f"  {key:<{width}} = {metrics[key]}")

    def save_metrics(self, split: str, metrics: dict, combined: bool = True) -> None:
        """Write `metrics` to output_dir/{split}_results.json and, with `combined`, merge them into all_results.json
        (transformers' `Trainer.save_metrics`; main process only)."""
        if not self.accelerator.is_main_process:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / f"{split}_results.json").write_text(json.dumps(metrics, indent=4, sort_keys=True))
        if combined:
            path = self.output_dir / "all_results.json"
            merged = {**(json.loads(path.read_text()) if path.is_file() else {}), **metrics}
            path.write_text(json.dumps(merged, indent=4, sort_keys=True))

    def save_state(self) -> None:
        """Write `state` to output_dir/trainer_state.json (transformers' `Trainer.save_state`; main process only)."""
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.state.save_to_json(str(self.output_dir / "trainer_state.json"))
