"""Which data a training run reads: the objects passed to the trainer, else the config's files, else TRL's
`dataset_name`, each split picked as TRL's scripts pick it."""

from __future__ import annotations

from pathlib import Path

from dpokit.data.readers import load_rows
from dpokit.errors import ConfigError


def run_sources(cfg, train_dataset=None, eval_dataset=None) -> tuple:
    """(train, eval) sources: the objects passed in, else `train_file` / `eval_file`, else `dataset_name` (its test
    split evaluated only when `eval_strategy` asks for evaluation, as TRL's scripts do). An `eval_strategy` that asks
    for evaluation without evaluation data is refused, as in TRL; `eval_strategy: no` evaluates nothing."""
    train = train_dataset if train_dataset is not None else cfg.train_file
    if train is None and cfg.dataset_name:
        train = cfg.dataset_name
    evaluation = eval_dataset if eval_dataset is not None else cfg.eval_file
    asked = cfg.eval_strategy in ("steps", "epoch")
    if evaluation is None and cfg.dataset_name and asked:
        if Path(cfg.dataset_name).is_file():
            # One file is one split: its "test split" would be the training rows themselves.
            raise ConfigError(f"eval_strategy is {cfg.eval_strategy!r} but dataset_name {cfg.dataset_name!r} is "
                              "a single file (one split, the training data); set eval_file for evaluation")
        evaluation = cfg.dataset_name
    if asked and evaluation is None:
        raise ConfigError(f"eval_strategy is {cfg.eval_strategy!r} but there is no evaluation data: set eval_file "
                          "(or pass eval_dataset=), or set eval_strategy: no")
    return train, None if cfg.eval_strategy == "no" else evaluation


def load_split(source, split: str, cfg):
    """Rows of a data source; a source with splits gives `dataset_train_split` or `dataset_test_split`."""
    return load_rows(source, split=cfg.dataset_train_split if split == "train" else cfg.dataset_test_split,
                     config_name=cfg.dataset_config)
