"""Which data a training run reads: the objects passed to the trainer, else the config's files, else TRL's
`dataset_name`, each split picked as TRL's scripts pick it."""

from __future__ import annotations

import os
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


def eval_splits(evaluation) -> dict:
    """The evaluation sets of a source, by split name: one source is split ``eval`` (metrics ``eval_loss``, ...); a
    mapping {name: source} (transformers' dict `eval_dataset`) or a list of files (a YAML `eval_file` list, each
    named by its file name without extensions) gives split ``eval_<name>`` for each (metrics ``eval_<name>_loss``)."""
    if evaluation is None:
        return {}
    if isinstance(evaluation, (list, tuple)) and evaluation and all(
            isinstance(s, (str, os.PathLike)) for s in evaluation):
        named = {}
        for source in evaluation:
            name = Path(source).name.split(".")[0]
            if name in named:
                raise ConfigError(f"eval_file: {named[name]} and {source} are both named {name!r}; give a mapping "
                                  "{name: path} instead of a list")
            named[name] = source
        evaluation = named
    if not isinstance(evaluation, dict):
        return {"eval": evaluation}
    if not evaluation:
        raise ConfigError("eval_dataset: an empty mapping; give {name: data} or leave it unset")
    for name in evaluation:
        if not isinstance(name, str) or not name or "/" in name:
            raise ConfigError(f"eval_dataset: set name {name!r} must be a non-empty string without '/' (it names "
                              "the metrics eval_<name>_loss, ...)")
    return {f"eval_{name}": source for name, source in evaluation.items()}
