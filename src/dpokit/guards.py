"""What stops a training step before it can do harm: a non-finite loss or gradient (never applied to the weights,
named by its rows), and running out of memory (one line naming the settings that make a step smaller)."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Callable, Optional

import torch

from dpokit.errors import DpokitError
from dpokit.metrics import log


class NonFiniteError(DpokitError):
    """A NaN/Inf loss or gradient stopped the run before the optimizer step."""


class OutOfMemory(DpokitError):
    """A batch that does not fit in memory; the message names the settings that shrink it."""


def is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc)
    return (isinstance(exc, torch.cuda.OutOfMemoryError) or text.startswith("DefaultCPUAllocator: can't allocate")
            or "out of memory" in text.lower())


def rows_of(batches: list) -> list[int]:
    return sorted(int(r) for b in batches for r in b["row"].tolist())


class NonFiniteGuard:
    """`on_nonfinite`: stop (naming the step, the rows and the last good checkpoint) or skip the update, at most
    `max_nonfinite_steps` times. `where(row)` names a row as data errors do (`file.jsonl:LINE`); `last_checkpoint()`
    names the newest complete checkpoint (or None)."""

    def __init__(self, cfg, where: Optional[Callable[[int], str]], last_checkpoint: Callable[[], Optional[Path]]):
        self.policy, self.limit = cfg.on_nonfinite, cfg.max_nonfinite_steps
        self.where, self.last_checkpoint = where, last_checkpoint
        self.skipped = 0

    def _rows(self, batches: list) -> str:
        rows = rows_of(batches)
        if self.where is None:
            return f"rows {rows}"
        named = ", ".join(self.where(r) for r in rows[:8]) + (", ..." if len(rows) > 8 else "")
        return f"rows {rows}: {named}"

    def grad_norm_problem(self, norm: float, scaled: bool, batches: list) -> Optional[tuple]:
        """The problem to report for a gradient norm, or None. Under fp16 (`scaled`) an infinite gradient is the
        gradient scaler's overflow signal: the scaler skips that update and lowers the scale itself."""
        if math.isfinite(norm) or scaled:
            return None
        return f"gradient norm ({norm})", batches

    def stop_or_skip(self, what: str, batches: list, step: int) -> None:
        """Raise NonFiniteError, unless `skip` allows one more skipped step (the caller then makes no update)."""
        if self.policy == "skip" and self.skipped < self.limit:
            self.skipped += 1
            log(f"non-finite {what} at step {step} ({self._rows(batches)}); no update for this step "
                f"({self.skipped} skipped of max_nonfinite_steps={self.limit})")
            return
        latest = self.last_checkpoint()
        kept = f"last good checkpoint: {latest}" if latest else "no checkpoint had been written"
        why = "" if self.policy == "stop" else f" ({self.skipped} steps skipped already, max_nonfinite_steps={self.limit})"
        raise NonFiniteError(f"non-finite {what} at step {step} ({self._rows(batches)}); stopped before the optimizer "
                             f"step{why}; {kept}")

    def after_update(self, norm: float, batches: list, step: int) -> None:
        """An engine that updates inside backward (DeepSpeed) reports the norm only after the update."""
        if math.isfinite(norm):
            return
        raise NonFiniteError(f"non-finite gradient norm ({norm}) at step {step} ({self._rows(batches)}); the engine "
                             "applied this update before dpokit could check it, so the weights may now hold NaN/Inf; "
                             "stopped; resume from the last checkpoint (written before this update) or start again, "
                             "e.g. with a lower learning_rate")


def nonfinite_loss(acc, loss_sum: torch.Tensor, batch: dict, filler: bool) -> Optional[tuple]:
    """(what, batches) when the loss is non-finite on this or any other rank, else None. All ranks must agree, or one
    would stop while the others wait in the gradient all-reduce."""
    from dpokit import distributed as dist

    bad = not filler and not bool(torch.isfinite(loss_sum.detach()).all())
    what = f"loss ({float(loss_sum.detach().float().sum())})"
    if acc.num_processes == 1:
        return (what, [batch]) if bad else None
    if dist.all_reduce_sum(acc, [float(bad)])[0] == 0:
        return None
    rows = dist.gather_objects(acc, batch["row"].tolist() if bad else [])
    return what if bad else "loss (on another process)", [{"row": torch.tensor(sum(rows, []))}]


@contextlib.contextmanager
def out_of_memory_hint(cfg, phase: str, step: int, token_budget: Optional[int]):
    """An out-of-memory error becomes a one-line OutOfMemory naming the settings that make a step smaller."""
    try:
        yield
    except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError too
        if not is_out_of_memory(exc):
            raise
        if phase == "eval":
            raise OutOfMemory(f"out of memory during evaluation (per_device_eval_batch_size="
                              f"{cfg.per_device_eval_batch_size}, max_length={cfg.max_length}): lower "
                              "per_device_eval_batch_size or max_length") from exc
        if token_budget:
            raise OutOfMemory(f"out of memory in training step {step} (token_budget={token_budget}, max_length="
                              f"{cfg.max_length}, gradient_checkpointing={cfg.gradient_checkpointing}): lower "
                              "token_budget (the step's pairs stay the same, in more micro-batches), lower max_length, "
                              "or set gradient_checkpointing=true") from exc
        raise OutOfMemory(f"out of memory in training step {step} (per_device_train_batch_size="
                          f"{cfg.per_device_train_batch_size}, max_length={cfg.max_length}, gradient_checkpointing="
                          f"{cfg.gradient_checkpointing}): lower per_device_train_batch_size and raise "
                          "gradient_accumulation_steps to keep the effective batch, lower max_length, or set "
                          "gradient_checkpointing=true") from exc


class StopSignals:
    """While a training loop runs: SIGTERM (what SLURM and Kubernetes send before they kill a job) is noted and acted
    on at the next step boundary — every rank agrees on that step, the run writes a checkpoint there when
    `save_on_sigterm` is set, and stops with a line naming the step (exit 143) — so a pre-empted job loses at most one
    step. SIGINT (Ctrl-C) keeps Python's immediate KeyboardInterrupt. Handlers can only be set from the main thread;
    elsewhere the signal keeps its default."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = None

    def __enter__(self) -> "StopSignals":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._note)
        return self

    def _note(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def received(self, acc) -> Optional[int]:
        """The signal to stop for, agreed over all ranks (one rank's SIGTERM stops every rank at the same step)."""
        import signal

        from dpokit import distributed as dist

        seen = self.signum is not None
        if acc.num_processes > 1:
            seen = dist.all_reduce_max(acc, int(seen)) > 0
        return int(signal.SIGTERM) if seen else None
