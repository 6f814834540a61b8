"""`dpokit bench`: dpokit against TRL on the same model shape, pairs, pairs per step and precision, in one run.

    python -m dpokit.bench --preset cpu-tiny [--output result.json]

What is compared. Both sides train the same random-weight model (built from a config with a fixed seed and saved to
a temporary directory, which both load) on the same HH-RLHF pairs, tokenized once by dpokit with the Llama-2
tokenizer, in the same order, with the same optimizer (AdamW, same learning rate, gradient clipping at 1.0, linear
schedule) and the same number of pairs per optimizer step. TRL gets dpokit's token ids as-is (its own tokenization
is bypassed, so the two cannot disagree on the data) and reads them in order instead of shuffling. TRL runs with each
micro-batch size in the preset's `trl_micro_batches` (gradient accumulation making up the step) and the best
throughput is reported; dpokit runs packed, with a token budget per micro-batch.

Each side runs in its own subprocess, so peak memory is its own and neither warms caches for the other.

dpokit side: `dpokit.DPOTrainer` as a user runs it (padding_free, share_prompt, token_budget, one data group of
pairs_per_step pairs per optimizer step), on the pre-tokenized pairs; TRL reads the same pairs in the order dpokit's
trainer draws them (`dpokit.schedule.data_order`), so step k of each side trains on the same pairs.

Figures (per side): tokens_per_second counts the non-padding tokens of the padded chosen-then-rejected layout (prompt
counted twice) for both sides, so a side that skips work (padding, a shared prompt) shows it as speed, not as fewer
tokens; pairs_per_second; median_step_seconds over the timed steps (the first `warmup_steps` are not timed);
peak_memory_bytes (CUDA: max allocated; CPU: the worker process's peak resident set, Python and torch included);
mfu (policy training FLOPs, 6 x params x tokens plus the LM head on scored tokens, over the device's peak; null on CPU,
which has no agreed peak, unless --peak-tflops is given); first_step_loss (the DPO loss of the first step).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from dpokit.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TOKENIZER = REPO.parent / "shared" / "tokenizers" / "llama2"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-test.jsonl.gz"

# Peak dense bf16 tensor-core FLOP/s by device name (no sparsity), for MFU.
PEAK_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


@dataclass
class Preset:
    model_type: str  # llama | qwen2
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    pairs_per_step: int
    steps: int  # timed steps; warmup_steps more run first
    max_length: int
    token_budget: int  # dpokit's packed tokens per micro-batch
    trl_micro_batches: tuple  # micro-batch sizes TRL is run with; the fastest is reported
    precision: str = "fp32"  # fp32 | bf16 (autocast, float32 master weights, both sides)
    warmup_steps: int = 1
    tie_word_embeddings: bool = False
    gradient_checkpointing: bool = False
    device: str = "cpu"
    learning_rate: float = 1e-6
    beta: float = 0.1
    seed: int = 0
    description: str = ""
    synthetic_lengths: tuple = ()  # `long` presets: random-token pairs of these sequence lengths instead of HH pairs


PRESETS = {
    "cpu-tiny": Preset("llama", 128, 344, 2, 4, 4, 32000, pairs_per_step=8, steps=3, max_length=512,
                       token_budget=8192, trl_micro_batches=(4, 8), description="2-layer Llama, hidden 128, "
                       "Llama-2 vocabulary; runs on 2 CPU cores in a few minutes"),
    "llama-1b": Preset("llama", 2048, 8192, 16, 32, 8, 128256, pairs_per_step=32, steps=10, max_length=1024,
                       token_budget=16384, trl_micro_batches=(4, 8, 16), precision="bf16", device="cuda",
                       warmup_steps=2, description="Llama-3.2-1B shape"),
    "tinyllama-1.1b": Preset("llama", 2048, 5632, 22, 32, 4, 32000, pairs_per_step=32, steps=10, max_length=1024,
                             token_budget=16384, trl_micro_batches=(4, 8, 16), precision="bf16", device="cuda",
                             warmup_steps=2, description="TinyLlama-1.1B shape"),
    # One pair per step of synthetic sequences (prompt and each completion half the length), gradient checkpointing on
    # both sides: the long-context regime, where packing gains nothing and memory decides.
    "long": Preset("llama", 2048, 8192, 16, 32, 8, 128256, pairs_per_step=1, steps=3, max_length=32768,
                   token_budget=49152, trl_micro_batches=(1,), precision="bf16", device="cuda", warmup_steps=1,
                   gradient_checkpointing=True, synthetic_lengths=(8192, 32768),
                   description="Llama-3.2-1B shape, synthetic 8K and 32K pairs, 1 pair per step"),
    "qwen-0.5b": Preset("qwen2", 896, 4864, 24, 14, 2, 151936, pairs_per_step=32, steps=10, max_length=1024,
                        token_budget=16384, trl_micro_batches=(4, 8, 16), precision="bf16", device="cuda",
                        warmup_steps=2, tie_word_embeddings=True, description="Qwen2.5-0.5B shape"),
}


@dataclass
class Job:
    """Everything a worker subprocess needs (written as JSON next to the model)."""

    preset: dict
    model_dir: str
    pairs_file: str
    threads: int
    shared_prompt: bool = True
    precompute_ref: bool = False
    trl_micro_batch: Optional[int] = None
    peak_flops: Optional[float] = None
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------------
# Setup (main process)


def build_model(p: Preset):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=p.vocab_size, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
                  num_hidden_layers=p.num_hidden_layers, num_attention_heads=p.num_attention_heads,
                  num_key_value_heads=p.num_key_value_heads, max_position_embeddings=max(2048, p.max_length, *p.synthetic_lengths),
                  tie_word_embeddings=p.tie_word_embeddings, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(p.seed)
    if p.model_type == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    if p.model_type == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False))
    raise ValueError(f"unknown model_type {p.model_type!r}")


def load_pairs(p: Preset, tokenizer_path: Path, data_path: Path, n_pairs: int):
    """`n_pairs` HH-RLHF pairs, tokenized by dpokit (max_length, keep_end), drawn in a seeded order."""
    import numpy as np
    from transformers import AutoTokenizer

    from dpokit import data as D

    tok = AutoTokenizer.from_pretrained(str(tokenizer_path))
    rows, name = D.load_rows(str(data_path))
    examples, report = D.preference_examples(rows, name)
    order = np.random.default_rng(p.seed).permutation(len(examples))
    picked = [examples[i] for i in order[: int(n_pairs * 1.1) + 8]]  # a few spare for rows dropped by truncation
    pairs = D.tokenize_preference(picked, tok, max_length=p.max_length, truncation_mode="keep_end", report=report)
    if len(pairs) < n_pairs:
        raise DataError(f"{data_path} gave only {len(pairs)} usable pairs; {n_pairs} needed")
    return pairs[:n_pairs]


def synthetic_pairs(p: Preset, length: int, n_pairs: int):
    """`n_pairs` pairs of random token ids (seeded): prompt length/2 tokens, chosen and rejected length/2 each (the
    last an EOS), so each sequence is `length` tokens."""
    import numpy as np

    from dpokit.data.tokenize import TokenizedPair

    rng = np.random.default_rng(p.seed)
    half = length // 2

    def ids(n):
        return rng.integers(3, min(p.vocab_size, 32000), size=n).astype(np.int32)

    pairs = []
    for i in range(n_pairs):
        chosen, rejected = ids(length - half), ids(length - half)
        chosen[-1] = rejected[-1] = 2  # EOS
        pairs.append(TokenizedPair(ids(half), chosen, rejected, i))
    return pairs


def _save_pairs(pairs, path: Path) -> None:
    path.write_text(json.dumps([{"row": int(p.row), "prompt_ids": p.prompt_ids.tolist(),
                                 "chosen_ids": p.chosen_ids.tolist(), "rejected_ids": p.rejected_ids.tolist()}
                                for p in pairs]))


def _read_pairs(path: str):
    import numpy as np

    from dpokit.data.tokenize import TokenizedPair

    return [TokenizedPair(np.asarray(d["prompt_ids"], np.int32), np.asarray(d["chosen_ids"], np.int32),
                          np.asarray(d["rejected_ids"], np.int32), i) for i, d in enumerate(json.loads(Path(path).read_text()))]


# --------------------------------------------------------------------------------------------------------------------
# Worker helpers


def _setup_worker(job: Job):
    import torch

    torch.set_num_threads(job.threads)
    p = Preset(**job.preset)
    if p.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("preset needs a CUDA GPU; none is available")
    return p, torch.device(p.device)


def _peak_memory(device) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _policy_flops(model, tokens: int, scored: int) -> float:
    """6 x (decoder parameters x tokens + LM head parameters x scored tokens): forward + backward of the policy."""
    head = model.get_output_embeddings().weight.numel()
    embed = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    body = total - embed - (head if model.get_output_embeddings().weight is not model.get_input_embeddings().weight
                            else 0)
    return 6.0 * (body * tokens + head * scored)


def _summary(step_times, step_tokens, step_pairs, flops, warmup: int, peak_flops, peak_mem, losses, chosen_logps,
             extra) -> dict:
    timed = slice(warmup, None)
    seconds = sum(step_times[timed])
    mfu = None
    if peak_flops:
        mfu = sum(flops[timed]) / seconds / peak_flops
    return {"tokens_per_second": sum(step_tokens[timed]) / seconds, "pairs_per_second": sum(step_pairs[timed]) / seconds,
            "median_step_seconds": statistics.median(step_times[timed]), "peak_memory_bytes": peak_mem, "mfu": mfu,
            "first_step_loss": losses[0], "step_losses": losses, "first_step_chosen_logps": chosen_logps,
            "step_seconds": step_times, **extra}


def _device_peak_flops(device, given: Optional[float]) -> Optional[float]:
    import torch

    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value
    return None


# --------------------------------------------------------------------------------------------------------------------
# dpokit worker


def _run_dpokit(job: Job) -> dict:
    """dpokit's side: `dpokit.DPOTrainer` itself, packed (shared prompt) with the preset's token budget per
    micro-batch and all of a step's pairs in one data group; timed between the ends of consecutive steps."""
    import torch

    from dpokit import DPOConfig, DPOTrainer
    from dpokit.packing import padded_tokens

    p, device = _setup_worker(job)
    pairs = _read_pairs(job.pairs_file)
    steps = p.warmup_steps + p.steps
    out_dir = tempfile.mkdtemp(prefix="dpokit-bench-dpokit-")
    os.environ["DPOKIT_CACHE_DIR"] = os.path.join(out_dir, "cache")  # a precompute is always computed, never read
    cfg = DPOConfig(output_dir=os.path.join(out_dir, "run"), per_device_train_batch_size=p.pairs_per_step,
                    gradient_accumulation_steps=1, max_steps=steps, learning_rate=p.learning_rate,
                    lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, beta=p.beta,
                    loss_type="sigmoid", max_length=p.max_length, logging_steps=1, save_steps=0, seed=p.seed,
                    bf16=p.precision == "bf16", padding_free=True, share_prompt=job.shared_prompt,
                    token_budget=p.token_budget, precompute_ref_log_probs=job.precompute_ref,
                    gradient_checkpointing=p.gradient_checkpointing, torch_compile=job.extra.get("compile", False),
                    disable_tqdm=True)
    marks, records, passes = [], [], []

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    class TimedDPOTrainer(DPOTrainer):
        def training_step(self, micro):
            passes.append(len(micro))
            record, tokens = super().training_step(micro)
            sync()
            marks.append(time.perf_counter())
            records.append(record)
            return record, tokens

    t0 = time.perf_counter()
    trainer = TimedDPOTrainer(job.model_dir, args=cfg, train_dataset=pairs)
    setup_seconds = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync()
    marks.append(time.perf_counter())
    trainer.train()
    if len(records) != steps:
        raise RuntimeError(f"dpokit ran {len(records)} steps; expected {steps}")
    groups = [[pairs[i] for i in g] for g in trainer.schedule.epoch_batches(0)][:steps]
    times = [b - a for a, b in zip(marks, marks[1:])]
    tokens = [padded_tokens(g) for g in groups]
    scored = [sum(len(q.chosen_ids) + len(q.rejected_ids) for q in g) for g in groups]
    flops = [_policy_flops(trainer.model, t, n) for t, n in zip(tokens, scored)]
    peak = _device_peak_flops(device, job.peak_flops)
    extra = {"micro_batches_per_step": passes, "token_budget": p.token_budget, "shared_prompt": job.shared_prompt,
             "precompute_ref": job.precompute_ref, "setup_seconds": setup_seconds,
             "torch_compile": bool(job.extra.get("compile", False))}
    return _summary(times, tokens, [len(g) for g in groups], flops, p.warmup_steps, peak, _peak_memory(device),
                    [float(r["loss"]) for r in records], float(records[0]["logps/chosen"]), extra)


# --------------------------------------------------------------------------------------------------------------------
# TRL worker


def _run_trl(job: Job) -> dict:
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from dpokit.packing import padded_tokens
    from dpokit.schedule import data_order

    p, device = _setup_worker(job)
    # In the order dpokit's trainer draws them (its seeded shuffle of epoch 0): TRL reads them sequentially, so both
    # sides' step k trains on the same pairs.
    pairs = _read_pairs(job.pairs_file)
    pairs = [pairs[i] for i in data_order(len(pairs), p.seed, 0)]
    steps = p.warmup_steps + p.steps
    mb = job.trl_micro_batch
    if p.pairs_per_step % mb:
        raise ValueError(f"TRL micro-batch {mb} does not divide pairs_per_step {p.pairs_per_step}")
    data = Dataset.from_dict({"prompt_ids": [q.prompt_ids.tolist() for q in pairs],
                              "chosen_ids": [q.chosen_ids.tolist() for q in pairs],
                              "rejected_ids": [q.rejected_ids.tolist() for q in pairs]})

    class BenchDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # dpokit's token ids, unchanged: both sides see exactly the same tokens

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)  # the pairs in dpokit's order

    class Timer(TrainerCallback):
        def __init__(self):
            self.marks, self.logs = [], []

        def _mark(self):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.marks.append(time.perf_counter())

        def on_train_begin(self, args, state, control, **kw):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            self._mark()

        def on_step_end(self, args, state, control, **kw):
            self._mark()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.logs.append(dict(logs))

    out_dir = tempfile.mkdtemp(prefix="dpokit-bench-trl-")
    cfg = DPOConfig(output_dir=out_dir, per_device_train_batch_size=mb, gradient_accumulation_steps=p.pairs_per_step // mb,
                    max_steps=steps, learning_rate=p.learning_rate, lr_scheduler_type="linear", warmup_steps=0,
                    weight_decay=0.0, max_grad_norm=1.0, beta=p.beta, loss_type=["sigmoid"], max_length=None,
                    logging_steps=1, report_to="none", save_strategy="no", seed=p.seed, bf16=p.precision == "bf16",
                    use_cpu=device.type == "cpu", gradient_checkpointing=p.gradient_checkpointing,
                    precompute_ref_log_probs=job.precompute_ref, dataloader_num_workers=0, disable_tqdm=True,
                    model_init_kwargs={"dtype": torch.float32}, use_liger_kernel=job.extra.get("liger", False))
    tok = AutoTokenizer.from_pretrained(job.model_dir)
    timer = Timer()
    trainer = BenchDPOTrainer(model=job.model_dir, args=cfg, train_dataset=data, processing_class=tok,
                              callbacks=[timer])
    trainer.train()
    times = [b - a for a, b in zip(timer.marks, timer.marks[1:])]
    if len(times) != steps or len(timer.logs) != steps:
        raise RuntimeError(f"TRL ran {len(times)} steps and logged {len(timer.logs)}; expected {steps}")
    groups = [pairs[i * p.pairs_per_step:(i + 1) * p.pairs_per_step] for i in range(steps)]
    tokens = [padded_tokens(g) for g in groups]
    model = trainer.model
    scored = [sum(len(q.chosen_ids) + len(q.rejected_ids) for q in g) for g in groups]
    flops = [_policy_flops(model, t, s) for t, s in zip(tokens, scored)]
    peak = _device_peak_flops(device, job.peak_flops)
    losses = [float(log["loss"]) for log in timer.logs]
    return _summary(times, tokens, [len(g) for g in groups], flops, p.warmup_steps, peak, _peak_memory(device),
                    losses, float(timer.logs[0]["logps/chosen"]),
                    {"micro_batch": mb, "gradient_accumulation_steps": p.pairs_per_step // mb,
                     "use_liger_kernel": bool(job.extra.get("liger", False))})


# --------------------------------------------------------------------------------------------------------------------
# Orchestration


def _spawn(side: str, job: Job, work: Path, tag: str = "") -> dict:
    """Run one side in a fresh interpreter; its result comes back as JSON."""
    name = f"{side}{tag}-{job.trl_micro_batch or 'packed'}"
    job_file, result_file = work / f"{name}.job.json", work / f"{name}.result.json"
    job_file.write_text(json.dumps(dataclasses.asdict(job)))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore",
               OMP_NUM_THREADS=str(job.threads))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src")] + [x for x in [env.get("PYTHONPATH")] if x])
    cmd = [sys.executable, "-m", "dpokit.bench", "--_worker", side, str(job_file), str(result_file)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the {side} worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(result_file.read_text())


def run(preset_name: str, *, steps: Optional[int] = None, pairs_per_step: Optional[int] = None,
        trl_micro_batches: Optional[list] = None, token_budget: Optional[int] = None, shared_prompt: bool = True,
        precompute_ref: bool = False, threads: Optional[int] = None, skip_trl: bool = False,
        tokenizer: Path = DEFAULT_TOKENIZER, data: Path = DEFAULT_DATA, peak_tflops: Optional[float] = None,
        compile: bool = False, find_max_length: bool = False, trl_liger: bool = False,
        trl_liger_micro_batches: Optional[list] = None, log=print) -> dict:
    """Run the benchmark; returns {"preset": ..., "dpokit": {...}, "trl": {...}} (no "trl" with skip_trl; with
    `trl_liger` also "trl_liger": TRL with use_liger_kernel, at its fastest micro-batch too, of
    `trl_liger_micro_batches` if given, else of TRL's). A `long`
    preset returns {"preset": ..., "lengths": {"8192": {"dpokit": ..., "trl": ...}, ...}} and, with
    `find_max_length`, "max_length": {"dpokit": N, "trl": N} (the longest that trained; null if none did)."""
    if preset_name not in PRESETS:
        raise ConfigError(f"unknown preset {preset_name!r}; choose from {', '.join(PRESETS)}")
    p = dataclasses.replace(PRESETS[preset_name])
    if trl_liger and (skip_trl or p.device != "cuda"):
        raise ConfigError("--trl-liger needs a CUDA preset and the TRL side (Liger's kernels are Triton, GPU only)")
    if trl_liger_micro_batches and not trl_liger:
        raise ConfigError("--trl-liger-micro-batches needs --trl-liger")
    if steps is not None:
        p.steps = steps
    if pairs_per_step is not None:
        p.pairs_per_step = pairs_per_step
    if token_budget is not None:
        p.token_budget = token_budget
    if trl_micro_batches:
        p.trl_micro_batches = tuple(trl_micro_batches)
    liger_sizes = tuple(trl_liger_micro_batches or p.trl_micro_batches)
    bad = sorted({m for m in p.trl_micro_batches + liger_sizes if p.pairs_per_step % m})
    if bad:
        raise ConfigError(f"TRL micro-batch sizes {bad} do not divide pairs_per_step={p.pairs_per_step}")
    threads = threads or len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="dpokit-bench-") as tmp:
        work = Path(tmp)
        from transformers import AutoTokenizer

        model_dir = work / "model"
        build_model(p).save_pretrained(str(model_dir))
        AutoTokenizer.from_pretrained(str(tokenizer)).save_pretrained(str(model_dir))
        base = Job(preset=dataclasses.asdict(p), model_dir=str(model_dir), pairs_file=str(work / "pairs.json"),
                   threads=threads, shared_prompt=shared_prompt, precompute_ref=precompute_ref,
                   peak_flops=peak_tflops * 1e12 if peak_tflops else None,
                   extra={"compile": compile, "trl_liger": trl_liger, "liger_micro_batches": list(liger_sizes)})
        result = {"preset": {"name": preset_name, **dataclasses.asdict(p)}}
        n_pairs = p.pairs_per_step * (p.steps + p.warmup_steps)
        if not p.synthetic_lengths:
            _save_pairs(load_pairs(p, tokenizer, data, n_pairs), work / "pairs.json")
            log(f"[bench] {preset_name}: {p.description}; {n_pairs} HH pairs, {p.pairs_per_step} per step, "
                f"{p.warmup_steps}+{p.steps} steps, {p.precision}, {threads} threads")
            result.update(_both_sides(base, p, work, skip_trl, log))
            return result
        result["lengths"] = {}
        for length in p.synthetic_lengths:
            log(f"[bench] {preset_name}: {p.description}; {n_pairs} synthetic pairs of {length} tokens")
            result["lengths"][str(length)] = _at_length(base, p, length, work, skip_trl, log)
        if find_max_length:
            result["max_length"] = {side: _longest(base, p, side, work, log)
                                    for side in (("dpokit",) if skip_trl else ("dpokit", "trl"))}
    return result


def _both_sides(base: Job, p: Preset, work: Path, skip_trl: bool, log) -> dict:
    """dpokit, then TRL at each of the preset's micro-batch sizes (the fastest reported), on base's pairs. A TRL
    micro-batch that runs out of memory is recorded as such and the others compared (the largest that fits is often
    the fastest, so the sizes tried usually include one too many)."""
    log("[bench] dpokit ...")
    out = {"dpokit": _spawn("dpokit", base, work)}
    if skip_trl:
        return out
    variants = [("trl", False)] + ([("trl_liger", True)] if base.extra.get("trl_liger") else [])
    for name, liger in variants:
        trials, summary = [], []
        for mb in (base.extra.get("liger_micro_batches") or p.trl_micro_batches) if liger else p.trl_micro_batches:
            log(f"[bench] TRL{' with use_liger_kernel' if liger else ''}, micro-batch {mb} ...")
            job = dataclasses.replace(base, trl_micro_batch=mb, extra={**base.extra, "liger": liger})
            try:
                trials.append(_spawn("trl", job, work, tag="liger" if liger else ""))
            except RuntimeError as exc:
                if "out of memory" not in str(exc).lower():
                    raise
                log(f"[bench] TRL micro-batch {mb}: out of memory")
                summary.append({"micro_batch": mb, "tokens_per_second": None, "error": "out of memory"})
                continue
            summary.append({"micro_batch": mb, "tokens_per_second": trials[-1]["tokens_per_second"]})
        if not trials:
            raise RuntimeError(f"{name}: every micro-batch ran out of memory ({summary})")
        out[name] = {**max(trials, key=lambda r: r["tokens_per_second"]), "micro_batch_trials": summary}
    return out


def _at_length(base: Job, p: Preset, length: int, work: Path, skip_trl: bool, log, steps: Optional[int] = None,
               warmup: Optional[int] = None) -> dict:
    """Both sides on synthetic pairs of `length` tokens per sequence."""
    q = dataclasses.replace(p, max_length=length, token_budget=max(p.token_budget, 2 * length),
                            steps=p.steps if steps is None else steps,
                            warmup_steps=p.warmup_steps if warmup is None else warmup)
    _save_pairs(synthetic_pairs(q, length, q.pairs_per_step * (q.steps + q.warmup_steps)), work / "pairs.json")
    job = dataclasses.replace(base, preset=dataclasses.asdict(q), pairs_file=str(work / "pairs.json"))
    return _both_sides(job, q, work, skip_trl, log)


def _longest(base: Job, p: Preset, side: str, work: Path, log, start: int = 8192,
             limit: int = 1 << 20) -> Optional[int]:
    """The longest sequence (doubling from `start`) `side` trains at one pair per step before running out of memory:
    one warmup and one timed step per length; only an out-of-memory failure ends the search (others are raised)."""
    best, length = None, start
    while length <= limit:
        log(f"[bench] {side}: trying {length} tokens ...")
        q = dataclasses.replace(p, max_length=length, token_budget=max(p.token_budget, 2 * length), steps=1,
                                warmup_steps=1)
        _save_pairs(synthetic_pairs(q, length, 2 * q.pairs_per_step), work / "pairs.json")
        job = dataclasses.replace(base, preset=dataclasses.asdict(q), pairs_file=str(work / "pairs.json"),
                                  trl_micro_batch=1 if side == "trl" else None)
        try:
            _spawn(side, job, work)
        except RuntimeError as exc:
            if "out of memory" not in str(exc).lower():
                raise
            log(f"[bench] {side}: out of memory at {length} tokens")
            break
        best, length = length, length * 2
    return best


def format_table(result: dict) -> str:
    if "lengths" in result:
        parts = [f"-- {length} tokens per sequence --\n" + format_table(r) for length, r in result["lengths"].items()]
        if "max_length" in result:
            parts.append("longest sequence trained at 1 pair per step: " + ", ".join(
                f"{side} {n if n else 'none'}" for side, n in result["max_length"].items()))
        return "\n".join(parts)
    sides = [s for s in ("dpokit", "trl", "trl_liger") if s in result]
    rows = [("tokens/s (non-padding)", "tokens_per_second", "{:,.0f}"), ("pairs/s", "pairs_per_second", "{:.2f}"),
            ("median step (s)", "median_step_seconds", "{:.3f}"), ("peak memory (MiB)", "peak_memory_bytes", None),
            ("MFU", "mfu", None), ("first-step loss", "first_step_loss", "{:.6f}"),
            ("first-step logp(chosen)", "first_step_chosen_logps", "{:.4f}")]
    lines = [f"{'':<26}" + "".join(f"{s:>16}" for s in sides)]
    for label, key, fmt in rows:
        cells = []
        for s in sides:
            v = result[s].get(key)
            if v is None:
                cells.append("n/a")
            elif key == "peak_memory_bytes":
                cells.append(f"{v / 2**20:,.0f}")
            elif key == "mfu":
                cells.append(f"{100 * v:.1f}%")
            else:
                cells.append(fmt.format(v))
        lines.append(f"{label:<26}" + "".join(f"{c:>16}" for c in cells))
    for other, label in (("trl", "TRL"), ("trl_liger", "TRL+Liger")):
        if "dpokit" in result and other in result:
            d, t = result["dpokit"], result[other]
            lines.append(f"dpokit / {label}: {d['tokens_per_second'] / t['tokens_per_second']:.2f}x tokens/s, "
                         f"{d['peak_memory_bytes'] / t['peak_memory_bytes']:.2f}x peak memory, first-step loss "
                         f"difference {abs(d['first_step_loss'] - t['first_step_loss']):.2e} "
                         f"({label} micro-batch {t['micro_batch']} x {t['gradient_accumulation_steps']} accumulation)")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dpokit.options import positive_float, positive_int

    parser.add_argument("--preset", default="cpu-tiny", choices=sorted(PRESETS))
    parser.add_argument("--output", writes=True, help="write the result as JSON to this file")
    parser.add_argument("--steps", type=positive_int, help="timed optimizer steps (default: the preset's)")
    parser.add_argument("--pairs-per-step", type=positive_int, help="pairs per optimizer step (default: the preset's)")
    parser.add_argument("--token-budget", type=positive_int, help="dpokit's packed tokens per micro-batch")
    parser.add_argument("--trl-micro-batches", type=positive_int, nargs="+", help="TRL micro-batch sizes to try")
    parser.add_argument("--no-shared-prompt", action="store_true", help="dpokit: pack prompt twice per pair")
    parser.add_argument("--precompute-ref", action="store_true",
                        help="both sides precompute the reference log-probs before training (not timed)")
    parser.add_argument("--find-max-length", action="store_true",
                        help="long presets: also find the longest sequence each side trains before running out of memory")
    parser.add_argument("--compile", action="store_true", help="dpokit: torch_compile=true (decoder layers)")
    parser.add_argument("--threads", type=positive_int, help="CPU threads per side (default: all available)")
    parser.add_argument("--skip-trl", action="store_true", help="run the dpokit side only")
    parser.add_argument("--trl-liger", action="store_true",
                        help="also run TRL with use_liger_kernel (CUDA presets; needs liger-kernel), as trl_liger")
    parser.add_argument("--trl-liger-micro-batches", type=positive_int, nargs="+",
                        help="micro-batch sizes TRL with use_liger_kernel is run with (default: --trl-micro-batches)")
    parser.add_argument("--peak-tflops", type=positive_float, help="device peak TFLOP/s for MFU (default: known GPUs only)")
    parser.add_argument("--tokenizer", type=Path, reads=True, default=DEFAULT_TOKENIZER, help="Llama-2 tokenizer directory")
    parser.add_argument("--data", type=Path, reads=True, default=DEFAULT_DATA, help="HH-RLHF jsonl(.gz) file")


def main(argv: Optional[list] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_worker"]:
        side, job_file, result_file = argv[1:4]
        job = Job(**json.loads(Path(job_file).read_text()))
        result = (_run_dpokit if side == "dpokit" else _run_trl)(job)
        Path(result_file).write_text(json.dumps(result))
        return 0
    from dpokit.options import Parser

    parser = Parser(prog="dpokit bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_from_args(args)


def run_from_args(args) -> int:
    result = run(args.preset, steps=args.steps, pairs_per_step=args.pairs_per_step,
                 trl_micro_batches=args.trl_micro_batches, token_budget=args.token_budget,
                 shared_prompt=not args.no_shared_prompt, precompute_ref=args.precompute_ref, threads=args.threads,
                 skip_trl=args.skip_trl, peak_tflops=args.peak_tflops, tokenizer=args.tokenizer, data=args.data,
                 compile=args.compile, find_max_length=args.find_max_length, trl_liger=args.trl_liger,
                 trl_liger_micro_batches=args.trl_liger_micro_batches)
    print(format_table(result))
    if args.output:
        from dpokit.fileio import atomic_write_text

        atomic_write_text(Path(args.output), json.dumps(result, indent=2))
        print(f"[bench] wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
