"""The data schedule: which examples each optimizer step trains on, on each process. Pure functions of the config
and the examples (no model, no collective), so it is tested on its own and replayed by `dpokit bench`.

Why it is built this way:
- The data order is global and seeded by (seed, epoch) alone: the same on every rank, on resume, and for anyone
  replaying a run. Resuming needs only (epoch, next data group), never a sampler's state, and the order draws nothing
  from the global RNGs that dropout uses.
- A *data group* is one micro-step over all processes (`per_device_train_batch_size x processes` examples), or with a
  token budget one whole optimizer step, which is packed into micro-batches afterwards. N processes then take exactly
  the examples one process with N times the batch would take, each rank its own disjoint part (`rank_part`).
- Every rank runs the same number of passes per step, since the engines' collectives must pair up: a rank whose part
  is empty runs a *filler*, a real example with zero weight.
- An epoch's last step takes what is left of it, as transformers' Trainer does: a step never mixes two epochs'
  shuffles.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from dpokit.distributed import rank_part

# (batch, is_filler) pairs of one optimizer step on this rank
MicroBatches = list


def data_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order in which training examples are drawn in `epoch`: a permutation from a generator of its own, seeded by
    (seed, epoch), so it is the same on every rank, on resume, and for anyone replaying a run (e.g. `dpokit bench`)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def example_tokens(example) -> int:
    """Tokens of one example (all its token-id fields), to balance the ranks' loads."""
    return sum(len(v) for v in vars(example).values() if isinstance(v, np.ndarray))


def rank_slice(examples: list, num_processes: int, process_index: int) -> list:
    """This rank's contiguous share of `examples` (evaluation, reference precomputation): sizes differ by at most one,
    and rank order is dataset order."""
    n = len(examples)
    return examples[process_index * n // num_processes:(process_index + 1) * n // num_processes]


class DataSchedule:
    """This rank's optimizer steps over `examples`.

    `collate(examples) -> batch` builds a micro-batch; with a `token_budget`, `pack(examples, budget) -> groups` splits
    one step's examples into micro-batches of at most that many tokens."""

    def __init__(self, examples: list, cfg, *, collate: Callable, num_processes: int = 1, process_index: int = 0,
                 token_budget: Optional[int] = None, pack: Optional[Callable] = None):
        self.examples, self.cfg, self.collate = examples, cfg, collate
        self.num_processes, self.process_index = num_processes, process_index
        self.token_budget, self.pack = token_budget, pack

    def global_micro_batch_size(self) -> int:
        """Examples per global data group (see the module docstring)."""
        size = self.cfg.per_device_train_batch_size * self.num_processes
        return size * self.cfg.gradient_accumulation_steps if self.token_budget else size

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The example indices of each global data group of `epoch` (all ranks together)."""
        cfg = self.cfg
        order = data_order(len(self.examples), cfg.seed if cfg.data_seed is None else cfg.data_seed, epoch)
        size = self.global_micro_batch_size()
        return [order[i:i + size] for i in range(0, len(order), size)]

    def groups_per_epoch(self) -> int:
        return math.ceil(len(self.examples) / self.global_micro_batch_size())

    def epochs_completed(self, epoch: int, group: int) -> float:
        """Epochs completed at data position (epoch, next data group), as transformers logs `epoch`: the epoch index
        plus the fraction of the epoch's micro-batches (of per_device_train_batch_size x processes examples) consumed,
        counted the same with a token budget."""
        n, size = len(self.examples), self.cfg.per_device_train_batch_size * self.num_processes
        consumed = min(group * self.global_micro_batch_size(), n)
        return epoch + math.ceil(consumed / size) / math.ceil(n / size)

    def steps_per_epoch(self) -> int:
        groups = self.groups_per_epoch()
        return groups if self.token_budget else math.ceil(groups / self.cfg.gradient_accumulation_steps)

    def total_steps(self) -> int:
        cfg = self.cfg
        return cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.num_train_epochs * self.steps_per_epoch()))

    def steps(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[int, int, MicroBatches]]:
        """Endless (epoch, next data group in epoch, micro-batches) stream of this rank's optimizer steps, from data
        group `start` of `epoch`; every rank gets the same number of micro-batches per step."""
        if self.token_budget:
            while True:
                batches = self.epoch_batches(epoch)
                for i in range(start, len(batches)):
                    yield epoch, i + 1, self._budget_micro_batches(batches[i])
                epoch, start = epoch + 1, 0
        stream, groups = self._micro_batches(epoch, start), self.groups_per_epoch()
        while True:
            micro = []
            for _ in range(self.cfg.gradient_accumulation_steps):
                epoch, index, batch, filler = next(stream)
                micro.append((batch, filler))
                if index + 1 >= groups:
                    break  # an epoch's last step takes what is left of it
            yield epoch, index + 1, micro

    def _micro_batches(self, epoch: int, start: int):
        """Endless (epoch, index in epoch, batch, is_filler) stream of this rank's part of each global micro-batch."""
        while True:
            batches = self.epoch_batches(epoch)
            for i in range(start, len(batches)):
                part = self._part(batches[i], self.process_index)
                yield epoch, i, self.collate([self.examples[j] for j in (part or batches[i][:1])]), not part
            epoch, start = epoch + 1, 0

    def _part(self, indices: list[int], rank: int) -> list[int]:
        sizes = [example_tokens(self.examples[j]) for j in indices]
        return rank_part(indices, sizes, rank, self.num_processes)

    def _budget_micro_batches(self, indices: list[int]) -> MicroBatches:
        """One optimizer step's examples (`indices`, all ranks) as this rank's token-budget micro-batches.

        The examples are split over the ranks by token count, then each rank's share is packed into micro-batches of
        at most `token_budget` tokens. Every rank computes every rank's packing (a pure function of the step's
        examples, no collective), so all know the step's number of passes: the most any rank needs. A rank with fewer
        runs zero-weight fillers; balanced shares keep those rare."""
        packed = []
        for rank in range(self.num_processes):
            part = self._part(indices, rank)
            packed.append(self.pack([self.examples[j] for j in part], self.token_budget) if part else [])
        mine, passes = packed[self.process_index], max(len(p) for p in packed)
        micro = [(self.collate(group), False) for group in mine]
        filler = self.collate([self.examples[indices[0]]])
        return micro + [(filler, True)] * (passes - len(micro))


class Intervals:
    """When logging, evaluation and checkpoints happen, in optimizer steps: every N steps (fractions of the run
    resolved, as transformers reads them), at each epoch's end, or never. The last step is always logged, evaluated
    (`dpokit.callbacks.Flow`) and, under a save strategy, checkpointed."""

    def __init__(self, cfg, total_steps: int):
        from dpokit.config import steps_from

        self.cfg, self.total_steps = cfg, total_steps
        self.log_every = steps_from(cfg.logging_steps, total_steps)
        # Evaluation every `logging_steps` when `eval_strategy: steps` names no `eval_steps`, as in transformers;
        # dpokit's default (null) is steps when `eval_steps` is set, else the end only.
        self.eval_every = steps_from(cfg.eval_steps, total_steps) or self.log_every
        self.eval_strategy = cfg.eval_strategy or ("steps" if cfg.eval_steps else "no")
        self.save_every = steps_from(cfg.save_steps, total_steps)

    @staticmethod
    def _due(strategy: str, every: Optional[int], step: int, epoch_end: bool) -> bool:
        if strategy == "steps":
            return bool(every) and step % every == 0
        return strategy == "epoch" and epoch_end

    def log(self, step: int, epoch_end: bool) -> bool:
        return (step == self.total_steps or (step == 1 and self.cfg.logging_first_step)
                or self._due(self.cfg.logging_strategy, self.log_every, step, epoch_end))

    def evaluate(self, step: int, epoch_end: bool) -> bool:
        return step < self.total_steps and self._due(self.eval_strategy, self.eval_every, step, epoch_end)

    def save(self, step: int, epoch_end: bool) -> bool:
        # The last step is checkpointed under a save strategy, as transformers does (its trainer_state.json records
        # the whole run, and it can be a best checkpoint for load_best_model_at_end).
        # (`epoch`: the run's end ends an epoch, see `dpokit.callbacks.Flow`.)
        strategy = self.cfg.save_strategy
        if step == self.total_steps and strategy == "steps" and self.save_every:
            return True
        return self._due(strategy, self.save_every, step, epoch_end)
