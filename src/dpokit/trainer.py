"""The training loop, for SFT and for DPO and its family: setup -> train (-> step -> evaluate -> save).

`Trainer` is the recipe both share; `SFTTrainer` and `DPOTrainer` only say how data becomes batches and how a batch
becomes a loss. Everything that is not the loop lives in a module named for its job: the data schedule
(`dpokit.schedule`), the engine (`dpokit.engines`: single process/DDP, FSDP, DeepSpeed behind one interface; the
loop never names one), checkpoints (`dpokit.checkpoint`), the run directory (`dpokit.rundir`), metrics and warnings
(`dpokit.metrics`), the non-finite and out-of-memory guards (`dpokit.guards`), model and tokenizer loading
(`dpokit.models`) and transformers' trainer API (`dpokit.compat`). The loss comes from `dpokit.losses`; this module
reads only its spec (does it need a reference? WPO weights?) and never tests a loss name.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from dpokit import checkpoint as C
from dpokit import data as D
from dpokit import distributed as dist
from dpokit import losses, modelcard, models, rundir
from dpokit.callbacks import Events, check_callbacks, load_best_model, progress
from dpokit.compat import TransformersTrainerAPI, refuse_trl_arguments, refuse_trl_overrides
from dpokit.config import DPOConfig, SFTConfig, TrainConfig, config_from_args
from dpokit.data.sources import eval_splits, load_split, run_sources
from dpokit.data.collate import collate_packed, collate_packed_sft, collate_pairs, collate_sft
from dpokit.engines import make_engine
from dpokit.errors import ConfigError, DataError, DpokitError, Interrupted, WriteError
from dpokit.fileio import refuse_overlap
from dpokit.guards import (NonFiniteError, NonFiniteGuard, OutOfMemory, StopSignals, nonfinite_loss,  # noqa: F401
                           out_of_memory_hint)
from dpokit.metrics import (DisplacementWatch, MeanMeter, MetricsSink, log, logging_dir, set_log_level,  # noqa: F401
                            set_quiet, warn)
from dpokit.optim import group_names, make_optimizer
from dpokit.packing import batch_logps, enable_packed_attention, pack_by_cost, pack_pairs, pair_tokens
from dpokit.reference import (AdapterOffReference, ModelReference, data_fingerprint, frozen_copy,
                              model_fingerprint, precompute)
from dpokit.rundir import RUN_MARKER  # noqa: F401 (public: the file that marks a run directory)
from dpokit.schedule import DataSchedule, Intervals, rank_slice


class Trainer(TransformersTrainerAPI):
    """Subclasses define `config_class`, `prepare_data(source, split)`, `collate(examples)`, `batch_weight(batch)` and
    `loss_and_metrics(batch, train) -> (loss_sum, weight, metrics)`, where the step's loss is loss_sum / total weight
    over the micro-batches of one optimizer step (so gradient accumulation equals one big batch exactly)."""

    config_class: type = TrainConfig

    # ----- setup -----
    def __init__(self, model, args=None, train_dataset=None, eval_dataset=None, processing_class=None,
                 peft_config=None, callbacks=None):
        refuse_trl_overrides(type(self))  # an override dpokit would never call must not be ignored silently
        self.args = cfg = config_from_args(self.config_class, args)
        check_callbacks(callbacks)
        model = self._model_source(model)
        self.output_dir = Path(cfg.output_dir)
        rundir.check_writable(self.output_dir)  # before anything slow: a run that cannot save should not start
        refuse_overlap({"output_dir": self.output_dir}, rundir.run_inputs(cfg, model, train_dataset, eval_dataset))
        self.run_lock = rundir.RunLock(self.output_dir)
        if int(os.environ.get("RANK", "0")) == 0:  # the process that will hold the lock (the others never take it)
            self.run_lock.check_free()
        if cfg.resume_from_checkpoint is not None:
            C.resolve(cfg.resume_from_checkpoint, self.output_dir)  # a mistyped path fails now, not after loading
        self.ref_cache_keys: dict[str, str] = {}  # split -> key of the precomputed reference log-probs
        self.data_reports, self.data_sources = {}, {}
        set_log_level(cfg.log_level)
        from transformers import enable_full_determinism, set_seed

        enable_full_determinism(cfg.seed) if cfg.full_determinism else set_seed(cfg.seed)
        self.accelerator = dist.make_accelerator(cfg)
        self.engine = make_engine(self.accelerator)
        self.engine.check(cfg)
        if getattr(cfg, "inert_keys", None):
            log(f"TRL keys accepted that change nothing in dpokit: {', '.join(sorted(cfg.inert_keys))}")
        source = cfg.tokenizer_name_or_path or (model if isinstance(model, str) else None)
        self.tokenizer = models.load_tokenizer(source, cfg, tokenizer=processing_class,
                                               what="model" if source is model else "tokenizer")
        # Data before the model: a bad row should fail in seconds, not after loading billions of weights.
        train_source, eval_source = run_sources(cfg, train_dataset, eval_dataset)
        self.train_examples = self.prepare_data(train_source, "train") if train_source is not None else None
        self.eval_sets = {split: self.prepare_data(source, split) for split, source in eval_splits(eval_source).items()}
        self.eval_examples = next(iter(self.eval_sets.values()), None)  # the (first) evaluation set
        config = models.model_config(model, cfg)  # the settings against the model, before its weights load
        models.check_init_kwargs(config, cfg)
        self._check_positions(config)
        self.model = models.load_model(model, cfg)
        self._check_vocab(self.model)
        if cfg.disable_dropout:
            models.disable_dropout(self.model)
        self.use_peft = cfg.use_peft or peft_config is not None
        self.setup_reference_before_peft()
        if self.use_peft:
            self.model = models.apply_lora(self.model, cfg, peft_config)
            self.args = cfg = models.record_lora(cfg, self.model)
        if cfg.gradient_checkpointing:
            models.enable_checkpointing(self.model, cfg.gradient_checkpointing_kwargs)
        self.model.train()
        if cfg.padding_free:
            # Packed rows need attention kept inside each sequence: transformers' own sdpa would let packed
            # sequences attend to each other (position ids alone do not isolate them).
            enable_packed_attention(self.model)
        self.setup_reference()
        if cfg.torch_compile:
            models.compile_layers(self.model, cfg)
        self.model = self.model.to(self.accelerator.device)
        # Every policy forward goes through this module; `train` has the engine wrap it (DDP, FSDP), so the engine's
        # hooks run although dpokit.logps calls the decoder and LM head directly. `self.model` stays the plain model.
        self.policy: nn.Module = dist.PolicyCall(self.model)
        acc = self.accelerator
        self.schedule = None if self.train_examples is None else DataSchedule(
            self.train_examples, cfg, collate=self.collate, num_processes=acc.num_processes,
            process_index=acc.process_index, token_budget=self.token_budget(), pack=self.pack)
        # The loop's state: set by `train` (and by a resume), read by logging, checkpoints and `state`.
        self.global_step, self.optimizer, self.scheduler = 0, None, None
        self._position, self._meter, self._current = (0, 0), MeanMeter(), {}  # (epoch, next data group); metrics
        self._sink: Optional[MetricsSink] = None
        self._displacement, self._train_fp, self._eval_split = DisplacementWatch(), None, "eval"
        report = self.data_reports.get("train")
        self.guard = NonFiniteGuard(cfg, report.where if report else None, lambda: C.read_latest(self.output_dir))
        self.events = Events(self, callbacks)
        self.events("on_init_end")

    def _model_source(self, model):
        """The model argument, else `model_name_or_path`; a local path recorded absolute in the run's config (the
        default reference of `dpokit eval`, found from any directory)."""
        cfg = self.args
        model = cfg.model_name_or_path if model is None else model
        if model is None:
            raise ConfigError("no model: pass a model or set model_name_or_path")
        if isinstance(model, (str, os.PathLike)):
            model = str(Path(model).expanduser().resolve()) if Path(model).expanduser().exists() else str(model)
            cfg.model_name_or_path = model
        elif (path := models.model_path(model)) is not None:  # recorded, so `dpokit eval RUN` finds the reference
            cfg.model_name_or_path = path
        return model

    def _check_vocab(self, model: nn.Module, what: Optional[str] = None) -> None:
        splits = {"train": self.train_examples, **self.eval_sets}
        models.check_vocab(splits, self.data_reports, model.get_input_embeddings().num_embeddings, what)

    def _check_positions(self, config, what: str = "the model") -> None:
        splits = {"train": self.train_examples, **self.eval_sets}
        models.check_positions(config, splits, self.data_reports, self.args.max_length, what)

    def _finish_data(self, tokenized, report, name: str, split: str):
        """Print and keep the data report (written with the run, skipped rows included); refuse an empty set. The
        count line is a routine notice (info) unless rows were skipped, deduplicated, cut or dropped (a warning)."""
        log(report.summary(), level="warning" if report.changed else "info")
        self.data_reports[split], self.data_sources[split] = report, name
        if not tokenized:
            raise DpokitError(f"{name}: no usable {split} rows left after validation and truncation "
                              f"({report.summary()})")
        return tokenized

    # ----- what subclasses say -----
    def setup_reference_before_peft(self) -> None:
        pass

    def setup_reference(self) -> None:
        pass

    def on_engine_ready(self) -> None:
        """Called once the engine has wrapped the policy."""

    def prepare_data(self, source, split: str):
        raise NotImplementedError

    def collate(self, examples):
        raise NotImplementedError

    def batch_weight(self, batch: dict) -> float:
        raise NotImplementedError

    def loss_and_metrics(self, batch: dict, train: bool):
        raise NotImplementedError

    def token_budget(self) -> Optional[int]:
        """Packed tokens per micro-batch and process, or None for `per_device_train_batch_size` examples each."""
        return None

    def pack(self, examples: list, budget: int) -> list[list]:
        """`examples` split into micro-batches of at most `budget` tokens (trainers with a `token_budget`)."""
        raise NotImplementedError

    def pack_cost(self, example) -> int:
        """The tokens `example` takes in a packed micro-batch."""
        raise NotImplementedError

    def autocast(self):
        return self.engine.autocast(self.args.bf16)

    # ----- train -----
    def held(self):
        """The run directory's lock, held by the main process (`with trainer.held(): train(); save_model()`)."""
        return self.run_lock if self.accelerator.is_main_process else contextlib.nullcontext()

    def train(self, resume_from_checkpoint: Optional[str | bool] = None):
        """Run the optimisation; returns transformers' `TrainOutput`: global_step, training_loss (the mean loss of
        the steps run) and metrics (the last logged training metrics, train_runtime, train_loss).
        `resume_from_checkpoint` (else the config field): `latest` (or True) or a checkpoint directory, to continue
        a stopped run exactly. The run directory is locked meanwhile: a second run on it is refused."""
        if self.train_examples is None:
            raise ConfigError("no training data: pass train_dataset= or set train_file")
        budget = self.token_budget()
        if budget:  # refuse, before any work, a budget the longest training example cannot fit in
            self.pack([max(self.train_examples, key=self.pack_cost)], budget)
        with self.held():
            try:
                return self._train(resume_from_checkpoint)
            except WriteError as exc:  # a full disk or an I/O error: say which checkpoint is left to resume from
                raise WriteError(f"{exc}; {C.last_checkpoint_note(self.output_dir)}") from None

    def _train(self, resume_from_checkpoint):
        cfg, acc = self.args, self.accelerator
        resume = cfg.resume_from_checkpoint if resume_from_checkpoint is None else resume_from_checkpoint
        resume = C.LATEST if resume is True else None if resume is False else resume
        ckpt = rundir.claim(self.output_dir, resume=resume, overwrite=cfg.overwrite_output_dir,
                            main_process=acc.is_main_process,
                            same_run=lambda saved, what: C.check_same_run(saved, cfg, what))
        saved = C.load_state(ckpt) if ckpt is not None else None
        total_steps = self.schedule.total_steps()
        if saved is not None:  # refused before anything is written: the run's own record stays as it was
            C.check_trainer_can_resume(self, ckpt, saved[1], total_steps)
        if cfg.report_to_tensorboard:  # resolved once and recorded with the run, so that a resume writes there too
            cfg.logging_dir = logging_dir(cfg, self.output_dir, saved[1]["config"] if saved else None)
        acc.wait_for_everyone()  # every rank has checked the output directory before the first one writes into it
        if acc.is_main_process:
            self.run_lock.record_holder()
            rundir.start(self.output_dir, cfg, self.data_reports, self.data_sources)
        self.optimizer, self.scheduler = make_optimizer(self.model, cfg, self.engine, acc.device, total_steps)
        self.policy, self.optimizer = self.engine.prepare(self.policy, self.optimizer, cfg)
        if acc.num_processes > 1:
            log(f"{acc.num_processes} processes on {acc.device.type}, engine {self.engine.name} "
                f"({type(self.policy).__name__})")
        self.on_engine_ready()
        self.global_step, self._position, self._meter, self.guard.skipped = 0, (0, 0), MeanMeter(), 0
        if saved is not None:
            C.restore(self, ckpt, *saved, total_steps)
            if acc.is_main_process:
                C.write_latest(self.output_dir, ckpt)  # resuming an older checkpoint makes it the newest again
        self._sink = sink = MetricsSink.for_run(cfg, self.output_dir, acc.is_main_process,
                                                saved[1]["metrics"] if saved else None,
                                                self.global_step if saved else None)
        last, self._current, self._displacement = {}, {}, DisplacementWatch()
        loss_sum, loss_steps, started, first = 0.0, 0, time.perf_counter(), self.global_step
        stream = self.schedule.steps(*self._position)
        due, events = Intervals(cfg, total_steps), self.events
        groups = self.schedule.groups_per_epoch()
        epochs_done = self._position[0] + (self._position[1] >= groups)
        events.begin(due, total_steps, self.schedule.steps_per_epoch(), bool(self.eval_sets), sink.history)
        if saved is not None:
            events.restore(saved[1])
        control = events("on_train_begin")
        if cfg.eval_on_start and self.eval_sets and saved is None:
            self._evaluate_sets(dict(self.eval_sets))  # a baseline: as in transformers, not a best-model candidate
        self.policy.train()
        if saved is not None:
            # Last, so that nothing between here and the first step draws from the restored generators.
            C.restore_rng(C.rank_rng(saved[0], acc.num_processes, acc.process_index))
        try:
            with StopSignals() as stop:
                while self.global_step < total_steps and not control.should_training_stop:
                    t0 = time.perf_counter()
                    if self._position[1] in (0, groups):  # the first step of an epoch
                        events("on_epoch_begin")
                    events("on_step_begin")
                    epoch, position, micro = next(stream)
                    self._position = (epoch, position)
                    record, tokens = self.training_step([(self._to_device(b), filler) for b, filler in micro])
                    self.global_step += 1
                    events.state.global_step = self.global_step
                    events.state.epoch = self.schedule.epochs_completed(epoch, position)
                    # The loss and the preference metrics are logged as means over the steps since the last log; the
                    # learning rate and the gradient norm as the last step's values, as transformers logs them.
                    self._current = {"learning_rate": self.scheduler.get_last_lr()[0],
                                     **({"grad_norm": record.pop("grad_norm")} if "grad_norm" in record else {})}
                    record["tokens_per_second"] = tokens / max(time.perf_counter() - t0, 1e-9)
                    self._meter.add(record)
                    if "loss" in record:
                        loss_sum, loss_steps = loss_sum + record["loss"], loss_steps + 1
                    # A step can end an epoch (its last data group); a run that stops ends its epoch too.
                    done = epoch + (position >= groups)
                    epoch_end, epochs_done = done > epochs_done, done
                    control = events("on_step_end")
                    last = events.act() or last
                    if epoch_end or control.should_training_stop:
                        control = events("on_epoch_end")
                        last = events.act() or last
                    signum = stop.received(acc) if self.global_step < total_steps else None
                    if signum is not None:
                        self._stop(signum, saved=due.save(self.global_step, epoch_end), total_steps=total_steps)
        finally:
            sink.close()
        from transformers.trainer_utils import TrainOutput

        training_loss = loss_sum / loss_steps if loss_steps else float("nan")
        runtime = time.perf_counter() - started
        summary = {"train_runtime": runtime, "train_steps_per_second": (self.global_step - first) / runtime,
                   "train_loss": training_loss}
        summary = events.log(summary, to_file=False)  # printed and in log_history, as transformers logs it
        if cfg.load_best_model_at_end and events.state.best_model_checkpoint is not None:
            load_best_model(self, events.state)
        events("on_train_end")
        return TrainOutput(self.global_step, training_loss, {**last, **summary})

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.accelerator.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _stop(self, signum: int, saved: bool, total_steps: int) -> None:
        """SIGTERM at a step boundary: checkpoint this step (unless it was just saved, or save_on_sigterm is off)."""
        if self.args.save_on_sigterm and not saved:
            self._save_checkpoint()
        raise Interrupted(f"SIGTERM after step {self.global_step} of {total_steps}; "
                          f"{C.last_checkpoint_note(self.output_dir)} (resume with --resume)", signum)

    # ----- step -----
    def training_step(self, micro: list) -> tuple[dict, int]:
        """Forward and backward over this rank's micro-batches of one optimizer step (`(batch, is_filler)` pairs),
        then the update — unless a loss or the gradient is non-finite on any rank (checked before the update), which
        stops the run or skips the update per `on_nonfinite`. Returns the step's mean metrics over all ranks (none
        when skipped) and its token count over all ranks.

        The step's loss is sum over the global batch / global weight. The engines average gradients over ranks, so
        each rank backpropagates local_sum * num_processes / global_weight; fillers count with weight zero."""
        acc, engine, cfg = self.accelerator, self.engine, self.args
        world, step = acc.num_processes, self.global_step + 1
        real = [b for b, filler in micro if not filler]
        total_weight = dist.all_reduce_sum(acc, [float(sum(self.batch_weight(b) for b in real))])[0]
        step_metrics, tokens, problem, grad_norm = MeanMeter(), 0, None, float("nan")
        with out_of_memory_hint(cfg, "train", step, self.token_budget()):
            for i, (batch, filler) in enumerate(micro):
                last = i == len(micro) - 1
                with engine.accumulating(self.policy, last):
                    with self.autocast():
                        loss_sum, weight, metrics = self.loss_and_metrics(batch, train=True)
                    problem = nonfinite_loss(acc, loss_sum, batch, filler)
                    if problem is not None:
                        if world > 1:
                            engine.abandon(loss_sum, last)
                        break  # the first bad micro-batch is the one to name; the rest of the step never runs
                    engine.backward(loss_sum * (0.0 if filler else world / total_weight), last)
                if not filler:
                    step_metrics.add(metrics, weight)
                    # Non-padding tokens the step covered (a shared prompt counts for chosen and rejected, as TRL sees it).
                    tokens += int(batch.get("logical_tokens", batch["attention_mask"].sum()))
            if problem is None:
                grad_norm = engine.grad_norm([p for p in self.model.parameters() if p.requires_grad],
                                             cfg.max_grad_norm)
                if engine.updates_in_backward:
                    self.guard.after_update(grad_norm, real, step)
                else:
                    problem = self.guard.grad_norm_problem(grad_norm, acc.scaler is not None, real)
            if problem is None:
                self.optimizer.step()
        if problem is not None:
            self.guard.stop_or_skip(*problem, step)  # raises, unless on_nonfinite=skip allows one more skipped step
        with warnings.catch_warnings():
            # A skipped step still advances the schedule (so it stays aligned with max_steps); torch warns when a
            # scheduler steps before the optimizer ever has, which is just what skipping the first step does.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        step_metrics.sums, step_metrics.weights = dist.reduce_meter(acc, step_metrics.sums, step_metrics.weights)
        tokens = int(dist.all_reduce_sum(acc, [tokens])[0])
        return ({} if problem is not None else {**step_metrics.means(), "grad_norm": grad_norm}), tokens

    def _log_training_metrics(self) -> dict:
        """Log the mean metrics of the steps since the last log; warn (once per episode) about likelihood
        displacement."""
        record = {**self._meter.means(), **self._current}
        if self.args.on_nonfinite == "skip":
            record["nonfinite_steps"] = self.guard.skipped
        self.events.log(record)
        self._meter = MeanMeter()
        record["epoch"] = self.events.state.epoch
        warning = self._displacement.update(record) if self.accelerator.is_main_process else None
        if warning:
            warn(self.output_dir, self.global_step, "likelihood_displacement", warning)
        return record

    # ----- evaluate -----
    def _evaluate_sets(self, sets: Optional[dict] = None, prefix: str = "eval", to_file: bool = True) -> dict:
        return self.events.evaluate(sets, prefix, to_file)

    @torch.no_grad()
    def _evaluate(self, examples: list, split: str = "eval") -> dict:
        """The training metrics on `examples`; each rank evaluates its share and the weighted sums are reduced over
        ranks."""
        acc = self.accelerator
        was_training = self.policy.training
        self.policy.eval()
        meter, self._eval_split = MeanMeter(), split
        batches = list(self._loader(examples, self.args.per_device_eval_batch_size))
        self.events.handler.eval_dataloader = batches  # its length sizes transformers' evaluation progress bar
        # Every rank runs the same number of passes (FSDP gathers weights in each); extra ones weigh nothing.
        count = dist.all_reduce_max(acc, len(batches))
        filler = self.collate(examples[:1])
        with out_of_memory_hint(self.args, "eval", self.global_step + 1, self.token_budget()):
            for i in range(count):
                batch = self._to_device(batches[i] if i < len(batches) else filler)
                with self.autocast():
                    _, weight, metrics = self.loss_and_metrics(batch, train=False)
                if i < len(batches):
                    meter.add(metrics, weight)
                    self.events("on_prediction_step")
        if was_training:
            self.policy.train()
        meter.sums, meter.weights = dist.reduce_meter(acc, meter.sums, meter.weights)
        return meter.means()

    def _loader(self, examples: list, batch_size: int) -> DataLoader:
        """This rank's share of `examples` in dataset order. Its own generator: a DataLoader draws a seed when
        iterated, which must not come from the global RNG that dropout uses (evaluating would shift the training
        randomness, and eval_steps may change on resume)."""
        acc = self.accelerator
        return DataLoader(rank_slice(examples, acc.num_processes, acc.process_index), batch_size=batch_size,
                          shuffle=False, collate_fn=self.collate, generator=torch.Generator())

    # ----- save and resume -----
    def _writer(self, state: Optional[dict]):
        return lambda directory: C.write_model(directory, self.model, self.tokenizer, self.args, state,
                                               card=modelcard.render(self))

    def save_model(self, output_dir: Optional[str] = None) -> Path:
        """The model (or LoRA adapter) in Hugging Face format plus the tokenizer, written atomically into `output_dir`:
        everything goes to a temporary directory first and is moved in only when complete."""
        out = Path(output_dir or self.args.output_dir)
        modelcard.check_replaceable(out)  # before the collective below: every rank refuses alike
        state = self.engine.full_weights(self.policy, self.args.bf16)  # a collective where the weights are sharded
        if self.accelerator.is_main_process:
            lock = self.held() if out.resolve() == self.output_dir.resolve() else contextlib.nullcontext()
            with lock:
                try:
                    C.save_model(out, self._writer(state))
                except WriteError as exc:
                    raise WriteError(f"{exc}; {C.last_checkpoint_note(self.output_dir)}") from None
        self.accelerator.wait_for_everyone()  # no rank goes on (or exits) before the model is in place
        return out

    def _save_checkpoint(self) -> Path:
        return C.save_checkpoint(self)

# --------------------------------------------------------------------------------------------------------------------
# SFT


class SFTTrainer(Trainer):
    """Supervised fine-tuning: token-mean negative log-likelihood of the completion tokens."""

    config_class = SFTConfig

    def __init__(self, model, args=None, train_dataset=None, eval_dataset=None, processing_class=None,
                 peft_config=None, callbacks=None, **trl_arguments):
        refuse_trl_arguments(type(self).__name__, trl_arguments)
        super().__init__(model, args, train_dataset, eval_dataset, processing_class, peft_config, callbacks)

    def prepare_data(self, source, split: str):
        cfg = self.args
        rows, name = load_split(source, split, cfg)
        examples, report = D.sft_examples(rows, name, dataset_format=cfg.dataset_format,
                                          column_map=cfg.column_map, on_bad_rows=cfg.on_bad_rows,
                                          deduplicate=cfg.deduplicate)
        earlier = sum(isinstance(ex.prompt, list) and any(m["role"] == "assistant" for m in ex.prompt)
                      for ex in examples)
        if earlier and cfg.completion_only_loss:
            # TRL trains a `messages` row on every token; here the final turn is the completion. Say so.
            log(f"{name}: {earlier} {split} conversations have assistant turns before the final one; those turns are "
                "context (no loss) and only the final assistant turn is trained (completion_only_loss=true; false "
                "trains the whole conversation)")
        tokenized = D.tokenize_sft(examples, self.tokenizer, max_length=cfg.max_length,
                                   truncation_mode=cfg.truncation_mode, report=report)
        return self._finish_data(tokenized, report, name, split)

    def collate(self, examples):
        if self.args.padding_free:
            return collate_packed_sft(examples, self.args.completion_only_loss)
        return collate_sft(examples, self.tokenizer.pad_token_id, self.args.completion_only_loss)

    def batch_weight(self, batch: dict) -> float:
        if "completion_lengths" in batch:
            return float(batch["completion_lengths"].sum())
        return float(batch["completion_mask"][:, 1:].sum())

    def token_budget(self) -> Optional[int]:
        return self.args.token_budget

    def pack(self, examples: list, budget: int) -> list[list]:
        return pack_by_cost(examples, [self.pack_cost(ex) for ex in examples], budget)

    def pack_cost(self, example) -> int:
        return len(example.prompt_ids) + len(example.completion_ids)

    def loss_and_metrics(self, batch: dict, train: bool):
        out = self.policy(batch_logps, batch, chunk_size=self.args.logps_chunk_size)
        n = out.lengths.sum()
        loss_sum = -out.logps.sum()
        return loss_sum, float(n), {"loss": float(loss_sum.detach() / n.clamp(min=1))}


# --------------------------------------------------------------------------------------------------------------------
# DPO and family


class DPOTrainer(Trainer):
    """Preference optimisation: policy and reference log-probs of chosen and rejected -> `dpokit.losses`."""

    config_class = DPOConfig

    def __init__(self, model, ref_model=None, args=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None, callbacks=None, **trl_arguments):
        refuse_trl_arguments(type(self).__name__, trl_arguments)
        self._ref_model_arg = ref_model
        self.reference = None
        cfg = config_from_args(DPOConfig, args)
        refuse_overlap({"output_dir": cfg.output_dir}, {"ref_model": ref_model if isinstance(ref_model, str) else None})
        # The loss is built once, from settings checked when the config was made; each step checks tensors only.
        self.loss = losses.build(cfg)
        self.spec = self.loss.spec
        if not self.spec.needs_reference and ref_model is not None:
            raise ConfigError(f"a ref_model was given but loss_type {cfg.loss_type!r} uses no reference "
                              "(or reference_free is set)")
        for note in self.spec.notes:
            log(note)
        if ref_model is not None and ref_model is model and not isinstance(model, str):
            # The reference must stay frozen while the policy trains: one object cannot be both.
            raise ConfigError("model and ref_model are the same object; pass ref_model=None (a frozen copy of the "
                              "starting policy is made) or a separate model")
        super().__init__(model, cfg, train_dataset, eval_dataset, processing_class, peft_config, callbacks)

    # ----- data -----
    def prepare_data(self, source, split: str):
        cfg = self.args
        if isinstance(source, (list, tuple)) and source and isinstance(source[0], D.TokenizedPair):
            return self._finish_data(_pretokenized(source, cfg.max_length), D.DataReport(
                read=len(source), kept=len(source), skipped=0, format="tokenized", source="<tokenized>"),
                "<tokenized>", split)
        rows, name = load_split(source, split, cfg)
        examples, report = D.preference_examples(rows, name, dataset_format=cfg.dataset_format,
                                                 column_map=cfg.column_map, on_bad_rows=cfg.on_bad_rows,
                                                 chat_template_available=bool(self.tokenizer.chat_template),
                                                 pair_strategy=cfg.pair_strategy, min_score_gap=cfg.min_score_gap,
                                                 deduplicate=cfg.deduplicate)
        tokenized = D.tokenize_preference(examples, self.tokenizer, max_length=cfg.max_length,
                                          max_prompt_length=cfg.max_prompt_length,
                                          max_completion_length=cfg.max_completion_length,
                                          truncation_mode=cfg.truncation_mode, report=report)
        return self._finish_data(tokenized, report, name, split)

    def collate(self, pairs):
        if self.args.padding_free:
            return collate_packed(pairs, shared_prompt=self.args.share_prompt)
        return collate_pairs(pairs, self.tokenizer.pad_token_id)

    def batch_weight(self, batch: dict) -> float:
        return float(len(batch["row"]))

    def token_budget(self) -> Optional[int]:
        return self.args.token_budget

    def pack(self, pairs: list, budget: int) -> list[list]:
        return pack_pairs(pairs, budget, shared_prompt=self.args.share_prompt)

    def pack_cost(self, pair) -> int:
        return pair_tokens(pair, self.args.share_prompt)

    # ----- reference -----
    def setup_reference_before_peft(self) -> None:
        """The default reference is the starting policy: copy it now, before LoRA wraps it or training moves it."""
        cfg = self.args
        self._ref_module = None
        if not self.spec.needs_reference:
            return
        ref = self._ref_model_arg if self._ref_model_arg is not None else cfg.ref_model_name_or_path
        if ref is not None:
            self._check_positions(models.model_config(ref, cfg, what="ref_model"), what="ref_model")
            self._ref_module = models.load_model(ref, cfg, what="ref_model")
            self._check_vocab(self._ref_module, what="ref_model")
            if cfg.disable_dropout:
                models.disable_dropout(self._ref_module)
        elif not self.use_peft:
            self._ref_module = frozen_copy(self.model)

    def setup_reference(self) -> None:
        cfg = self.args
        if not self.spec.needs_reference:
            return
        if self._ref_module is not None:
            if cfg.padding_free:
                enable_packed_attention(self._ref_module)  # the reference runs the same packed batches
            if cfg.torch_compile and not cfg.precompute_ref_log_probs:
                models.compile_layers(self._ref_module, cfg)
            ref = ModelReference(self._ref_module.to(self.accelerator.device), self.loss.sequence_logps,
                                 cfg.logps_chunk_size, self.autocast)
            ref_fp = model_fingerprint(self._ref_module) if cfg.precompute_ref_log_probs else None
        else:
            ref = AdapterOffReference(self.model, self.loss.sequence_logps, cfg.logps_chunk_size, self.autocast)
            ref_fp = None
            if cfg.precompute_ref_log_probs:
                ref_fp = model_fingerprint(self.model, skip=lambda name: "lora_" in name)
        if not cfg.precompute_ref_log_probs:
            self.reference = ref
            return
        # Precompute over train and eval rows once; the cache key covers the reference weights, the exact token ids,
        # the aggregation (ld_alpha) and the precision, so a stale cache can never be read.
        self.model.to(self.accelerator.device)
        self.reference = {}
        for split, examples in (("train", self.train_examples), *self.eval_sets.items()):
            if examples is None:
                continue
            key = _sha(ref_fp, data_fingerprint(examples), str(cfg.ld_alpha), str(cfg.bf16), str(cfg.fp16))
            # Each rank computes its share (before the engine wraps anything: the model is whole on every rank
            # here, so no collective runs inside); `precompute` gathers the shares into the full table.
            loader = self._loader(examples, cfg.precompute_ref_batch_size or cfg.per_device_eval_batch_size)
            batches = (self._to_device(b) for b in progress(loader, f"reference log-probs ({split})", cfg,
                                                            self.accelerator.is_main_process))
            num_rows = max(int(p.row) for p in examples) + 1
            self.reference[split] = precompute(ref, batches, num_rows, cache_key=key, accelerator=self.accelerator)
            self.ref_cache_keys[split] = key
            log(f"reference log-probs for {len(examples)} {split} pairs precomputed (cache key {key[:12]})", "info")
        # Free the reference model: the whole point of precomputing is not to hold it during training.
        self._ref_module = None
        del ref

    def on_engine_ready(self) -> None:
        if isinstance(self.reference, AdapterOffReference):
            self.reference.call = self.policy  # the adapter-off pass needs the engine's hooks too (FSDP gathers)

    def ref_logps(self, batch: dict, train: bool) -> Optional[torch.Tensor]:
        if self.reference is None:
            return None
        if isinstance(self.reference, dict):
            return self.reference["train" if train else self._eval_split].logps(batch)
        return self.reference.logps(batch)

    # ----- loss -----
    def loss_and_metrics(self, batch: dict, train: bool):
        cfg = self.args
        b = len(batch["row"])
        out = self.policy(batch_logps, batch, chunk_size=cfg.logps_chunk_size,
                          with_weights=self.spec.needs_weight_logps)
        policy = self.loss.sequence_logps(out)  # the sum, or LD-DPO's with ld_alpha (the reference uses the same)
        ref = self.ref_logps(batch, train)
        weights = {}
        if self.spec.needs_weight_logps:
            weights = dict(chosen_weight_logps=out.weight_logps[:b], rejected_weight_logps=out.weight_logps[b:])
        result = self.loss(
            policy[:b], policy[b:],
            None if ref is None else ref[:b].to(policy.dtype), None if ref is None else ref[b:].to(policy.dtype),
            chosen_lengths=out.lengths[:b], rejected_lengths=out.lengths[b:], **weights)
        chosen_r, rejected_r = result.chosen_rewards, result.rejected_rewards
        metrics = {
            "loss": float(result.losses.detach().mean()),
            "rewards/chosen": float(chosen_r.mean()),
            "rewards/rejected": float(rejected_r.mean()),
            "rewards/accuracies": float((chosen_r > rejected_r).float().mean()),
            "rewards/margins": float((chosen_r - rejected_r).mean()),
            # The scores the loss reads, as TRL logs them (with ld_alpha, the length-desensitised sums).
            "logps/chosen": float(policy[:b].detach().mean()),
            "logps/rejected": float(policy[b:].detach().mean()),
        }
        for k, v in (result.metrics or {}).items():
            metrics[k] = float(v.detach().float().mean()) if isinstance(v, torch.Tensor) else float(v)
        return result.losses.sum(), float(b), metrics


def _pretokenized(pairs, max_length: Optional[int]) -> list:
    """Pairs already tokenized by dpokit (`dpokit.data.tokenize_preference`, e.g. once for several runs), used as
    given: nothing is cut here, so a pair over `max_length` or with an empty completion is an error, not trained on."""
    for i, p in enumerate(pairs):
        if not isinstance(p, D.TokenizedPair):
            raise DataError(f"<tokenized> row {i}: a {type(p).__name__} among TokenizedPair rows")
        for field_name in ("chosen_ids", "rejected_ids"):
            if len(getattr(p, field_name)) == 0:
                raise DataError(f"<tokenized> row {i}: field {field_name!r} is empty (no completion to train on)")
        longest = len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))
        if max_length is not None and longest > max_length:
            raise DataError(f"<tokenized> row {i}: {longest} tokens, more than max_length={max_length} (pre-tokenized"
                            " pairs are not truncated; tokenize with the run's max_length or raise it)")
    return list(pairs)


def _sha(*parts: Optional[str]) -> str:
    import hashlib

    return hashlib.sha256("\x00".join(p or "" for p in parts).encode()).hexdigest()
