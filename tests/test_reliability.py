"""Reliability (issue 6): exact resume after SIGKILL, atomic checkpoints, the non-finite guard, out-of-memory hints,
output_dir protection, and one-line messages for user mistakes (the table in docs/reliability.md)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import LLAMA2_TOKENIZER, tiny_llama
from dpokit import DPOConfig, DPOTrainer
from dpokit import checkpoint as C
from dpokit.cli import main
from dpokit.errors import ConfigError
from dpokit.trainer import NonFiniteError, OutOfMemory

ROOT = Path(__file__).resolve().parents[1]
# Five pairs, two per micro-batch, two micro-batches per step: an epoch (3 micro-batches) is a full step and a short
# one, so a resume must restore the position inside an epoch, not just the epoch.
PAIRS = [{"prompt": f"Question {i}: is it good?", "chosen": " Yes, it is good" + "!" * i, "rejected": " No."}
         for i in range(5)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine a second one mostly spins waiting for the first, and these
    tiny models gain nothing from it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(LLAMA2_TOKENIZER)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("base")
    tiny_llama(vocab_size=32000).save_pretrained(d)
    AutoTokenizer.from_pretrained(LLAMA2_TOKENIZER).save_pretrained(d)  # as shipped: no pad token
    return d


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PAIRS * 3))
    return path


def cfg(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2,
                max_steps=6, logging_steps=1, save_steps=2, disable_tqdm=True, seed=0)
    base.update(kw)
    return DPOConfig(**base)


def losses(run_dir):
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------------------------------------------------
# Exact resume


def test_lora_resume_with_dropout_is_exact_and_needs_the_rng_state(tmp_path, tok, monkeypatch):
    """LoRA keeps its dropout, so the resumed steps match only if the RNG states come back with the checkpoint."""
    lora = dict(use_peft=True, lora_r=4, lora_dropout=0.3)
    a = DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path / "a", **lora), train_dataset=PAIRS,
                   processing_class=tok)
    a.train()
    ckpt = tmp_path / "a" / "checkpoint-2"
    # The last step is checkpointed too (as transformers does under a save strategy), so `latest` names it.
    assert (tmp_path / "a" / "latest").read_text().strip() == "checkpoint-6"
    # Resume into a new output_dir from a checkpoint path: the whole history (steps 1-6) and the weights match.
    b = DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path / "b", resume_from_checkpoint=str(ckpt), **lora),
                   train_dataset=PAIRS, processing_class=tok)
    b.train()
    assert losses(tmp_path / "b") == losses(tmp_path / "a") and len(losses(tmp_path / "a")) == 6
    assert same_weights(a.model, b.model)
    # Control: without the RNG states the dropout masks differ and so do the results.
    monkeypatch.setattr(C, "restore_rng", lambda state: None)
    c = DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path / "c", resume_from_checkpoint=str(ckpt), **lora),
                   train_dataset=PAIRS, processing_class=tok)
    c.train()
    assert losses(tmp_path / "c")[:2] == losses(tmp_path / "a")[:2]
    assert losses(tmp_path / "c")[2:] != losses(tmp_path / "a")[2:]


def test_checkpoint_contents_load_safely(tmp_path, tok):
    t = DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path / "run", max_steps=3, save_steps=1),
                   train_dataset=PAIRS, processing_class=tok)
    t.train()
    ckpt = tmp_path / "run" / "checkpoint-2"
    # Only safetensors and a weights_only-loadable state: nothing in a checkpoint can run code when read.
    state = torch.load(ckpt / C.STATE_PT, weights_only=True)
    assert set(state) == {"optimizer", "scheduler", "scaler", "rng"}
    assert set(state["rng"]) == {"python", "numpy", "torch", "cuda"}
    info = json.loads((ckpt / C.STATE_JSON).read_text())
    assert info["global_step"] == 2 and info["position"] == [0, 3] and info["micro_step"] == 0
    assert [r["step"] for r in info["metrics"]] == [1, 2]
    assert not list(ckpt.glob("*.bin")) and not list(ckpt.glob("*.pkl"))
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(ckpt)  # every checkpoint is also a usable model


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_checkpoint_cannot_run_code_and_remote_code_is_off(tmp_path, tok):
    t = DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path / "run", max_steps=2, save_steps=1),
                   train_dataset=PAIRS, processing_class=tok)
    t.train()
    ckpt = tmp_path / "run" / "checkpoint-1"
    torch.save({"optimizer": _RunsCode()}, ckpt / C.STATE_PT)
    with pytest.raises(C.CheckpointError, match="cannot read checkpoint .*checkpoint-1: Weights only load failed"):
        C.load_state(ckpt)
    assert DPOConfig().trust_remote_code is False


def test_precomputed_reference_resume_is_exact(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("DPOKIT_CACHE_DIR", str(tmp_path / "cache"))
    pre = dict(precompute_ref_log_probs=True, max_steps=4)
    a = DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path / "a", **pre), train_dataset=PAIRS,
                   processing_class=tok)
    a.train()
    info = json.loads((tmp_path / "a" / "checkpoint-2" / C.STATE_JSON).read_text())
    assert info["ref_cache_keys"] == a.ref_cache_keys and len(a.ref_cache_keys["train"]) == 64
    b = DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path / "b", resume_from_checkpoint=str(
        tmp_path / "a" / "checkpoint-2"), **pre), train_dataset=PAIRS, processing_class=tok)
    b.train()
    assert losses(tmp_path / "b") == losses(tmp_path / "a") and same_weights(a.model, b.model)


def test_resume_refuses_another_run(tmp_path, tok):
    DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path / "a", max_steps=2, save_steps=1), train_dataset=PAIRS,
               processing_class=tok).train()
    ckpt = str(tmp_path / "a" / "checkpoint-1")
    other = DPOTrainer(tiny_llama(vocab_size=32000),
                       args=cfg(tmp_path / "b", max_steps=2, learning_rate=1e-3, resume_from_checkpoint=ckpt),
                       train_dataset=PAIRS, processing_class=tok)
    with pytest.raises(C.CheckpointError, match=r"the config differs in learning_rate \(0\.01 -> 0\.001\)"):
        other.train()
    other_data = DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path / "c", max_steps=2, resume_from_checkpoint=ckpt),
                            train_dataset=PAIRS[:4], processing_class=tok)
    with pytest.raises(C.CheckpointError, match="the training data differs from the checkpoint's"):
        other_data.train()
    lora = DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path / "d", max_steps=2, resume_from_checkpoint=ckpt,
                                                              use_peft=True), train_dataset=PAIRS, processing_class=tok)
    with pytest.raises(C.CheckpointError, match=r"use_peft \(False -> True\)"):
        lora.train()


def test_a_checkpoint_without_keys_added_since_resumes(tmp_path, tok):
    """A checkpoint written before a config key existed had that key's default: it resumes, and a changed value of
    such a key is still refused."""
    DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path / "a", max_steps=2, save_steps=1), train_dataset=PAIRS,
               processing_class=tok).train()
    ckpt = tmp_path / "a" / "checkpoint-1"
    state = json.loads((ckpt / C.STATE_JSON).read_text())
    for key in ("optim", "data_seed", "lr_scheduler_kwargs", "dtype"):
        del state["config"][key]
    (ckpt / C.STATE_JSON).write_text(json.dumps(state))
    (ckpt / C.MANIFEST).unlink()  # such a checkpoint was also written before checkpoints had a manifest
    DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path / "b", max_steps=2, resume_from_checkpoint=str(ckpt)),
               train_dataset=PAIRS, processing_class=tok).train()
    other = DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path / "c", max_steps=2, data_seed=3,
                                                               resume_from_checkpoint=str(ckpt)),
                       train_dataset=PAIRS, processing_class=tok)
    with pytest.raises(C.CheckpointError, match=r"the config differs in data_seed \(None -> 3\)"):
        other.train()


def test_resume_latest_without_a_checkpoint_starts_over(tmp_path, tok, capsys):
    """A job script passing --resume on every start: the first start has nothing to resume."""
    t = DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path / "run", max_steps=2, resume_from_checkpoint="latest"),
                   train_dataset=PAIRS, processing_class=tok)
    t.train()
    assert "no checkpoint in" in capsys.readouterr().out
    assert [s for s, _ in losses(tmp_path / "run")] == [1, 2]


def _dpo_cli(base_dir, pairs_file, out, *extra):
    return [sys.executable, "-m", "dpokit", "dpo", f"model_name_or_path={base_dir}", f"train_file={pairs_file}",
            f"output_dir={out}", "max_steps=8", "save_steps=1", "save_total_limit=2", "logging_steps=1",
            "per_device_train_batch_size=2", "gradient_accumulation_steps=2", "learning_rate=1e-3", "max_length=64",
            "disable_tqdm=true", "seed=0", *extra]


def _latest_step(out):
    pointer = out / C.LATEST
    return C.checkpoint_step(Path(pointer.read_text().strip())) if pointer.is_file() else 0


def _kill_when(proc, condition, delay=0.0):
    """SIGKILL `proc` `delay` seconds after `condition()` first holds; False if it finished first."""
    while proc.poll() is None:
        if condition():
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.02)
    return False


def test_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run(tmp_path, base_dir, pairs_file):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    popen = dict(env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    whole = tmp_path / "whole"  # the uninterrupted run, alongside the killed ones
    uninterrupted = subprocess.Popen(_dpo_cli(base_dir, pairs_file, whole), **popen)

    out, rng = tmp_path / "killed", random.Random(6)
    # 1. Somewhere in the steps after checkpoint-2.
    first = subprocess.Popen(_dpo_cli(base_dir, pairs_file, out), **popen)
    assert _kill_when(first, lambda: _latest_step(out) >= 2, delay=rng.uniform(0, 0.3))
    # 2. In the middle of a checkpoint save (the test hook holds each save open for 2 s before its rename).
    before = _latest_step(out)
    second = subprocess.Popen(_dpo_cli(base_dir, pairs_file, out, "--resume"),
                              **{**popen, "env": {**env, C.SLOW_SAVE_ENV: "2"}})
    assert _kill_when(second, lambda: any(out.glob(".tmp-checkpoint-*")), delay=rng.uniform(0, 0.5))
    assert any(out.glob(".tmp-checkpoint-*"))
    assert _latest_step(out) >= before
    C.load_state(C.read_latest(out))  # `latest` still names a complete, loadable checkpoint
    # 3. Right after a later checkpoint, then resume to the end.
    third = subprocess.Popen(_dpo_cli(base_dir, pairs_file, out, "--resume"), **popen)
    _kill_when(third, lambda: _latest_step(out) >= 6, delay=rng.uniform(0, 0.3))
    last = subprocess.run(_dpo_cli(base_dir, pairs_file, out, "--resume"), capture_output=True, text=True, env=env,
                          timeout=300)
    assert last.returncode == 0, last.stdout[-3000:] + last.stderr[-3000:]
    assert "resumed from" in last.stdout
    assert uninterrupted.wait(timeout=300) == 0, uninterrupted.stdout.read()[-3000:]

    assert losses(out) == losses(whole) and [s for s, _ in losses(out)] == list(range(1, 9))
    assert (out / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    assert not list(out.glob(".tmp-*"))  # the partial save of kill 2 was cleaned up
    # save_total_limit=2 keeps the last two; the last step is checkpointed too, as transformers does.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-7", "checkpoint-8"]


# --------------------------------------------------------------------------------------------------------------------
# Atomic saves


def test_a_crash_during_a_save_keeps_the_previous_checkpoint(tmp_path, tok, monkeypatch):
    out = tmp_path / "run"
    t = DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(out, max_steps=4, save_steps=1, save_total_limit=1),
                   train_dataset=PAIRS, processing_class=tok)
    calls = []

    def crash_on_second_save():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands in for a kill between writing the files and renaming them

    monkeypatch.setattr(C, "pause_for_tests", crash_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        t.train()
    # save_total_limit=1 deleted nothing: checkpoint-1 is kept until checkpoint-2 is complete, and `latest` names it.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert (out / ".tmp-checkpoint-2").is_dir() and C.read_latest(out) == out / "checkpoint-1"
    monkeypatch.undo()
    resumed = DPOTrainer(tiny_llama(vocab_size=32000),
                         args=cfg(out, max_steps=4, save_steps=1, save_total_limit=1, resume_from_checkpoint="latest"),
                         train_dataset=PAIRS, processing_class=tok)
    resumed.train()
    assert not (out / ".tmp-checkpoint-2").exists()
    assert [s for s, _ in losses(out)] == [1, 2, 3, 4]


def test_overwrite_output_dir_removes_the_old_runs_checkpoints(tmp_path, tok):
    out = tmp_path / "run"
    DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(out, max_steps=3, save_steps=1), train_dataset=PAIRS,
               processing_class=tok).train()
    again = DPOTrainer(tiny_llama(vocab_size=32000),
                       args=cfg(out, max_steps=1, save_steps=0, overwrite_output_dir=True),
                       train_dataset=PAIRS, processing_class=tok)
    again.train()
    assert not list(out.glob("checkpoint-*")) and not (out / C.LATEST).exists()
    assert [s for s, _ in losses(out)] == [1]


def test_overwrite_output_dir_leaves_nothing_of_the_old_run_to_be_loaded(tmp_path, tok):
    """A LoRA run, then a full run over it: the old adapter would otherwise be loaded instead of the new model (by
    `from_pretrained` with peft installed and by `dpokit eval`), and the old warnings and eval would stay."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    lora = DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(out, max_steps=1, use_peft=True, lora_r=4),
                      train_dataset=PAIRS, processing_class=tok)
    lora.train()
    lora.save_model()
    (out / "warnings.jsonl").write_text('{"step": 1, "kind": "likelihood_displacement", "message": "old"}\n')
    (out / "eval.json").write_text("{}")
    assert (out / "adapter_config.json").is_file()
    full = DPOTrainer(tiny_llama(vocab_size=32000, seed=5), args=cfg(out, max_steps=1, overwrite_output_dir=True),
                      train_dataset=PAIRS, processing_class=tok)
    full.train()
    full.save_model()
    left = sorted(p.name for p in out.iterdir())
    assert not any(n.startswith("adapter_") or n in ("warnings.jsonl", "eval.json") for n in left), left
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert not hasattr(loaded, "peft_config") and same_weights(loaded, full.model)


def test_save_model_removes_weights_of_another_kind(tmp_path, tok):
    """save_model into a directory holding an adapter (or other weights) leaves only the model just written."""
    out = tmp_path / "export"
    out.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "pytorch_model.bin", "notes.txt"):
        (out / name).write_text("old")
    t = DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path / "run", max_steps=1), train_dataset=PAIRS,
                   processing_class=tok)
    t.save_model(str(out))
    left = {p.name for p in out.iterdir()}
    assert "model.safetensors" in left and "notes.txt" in left
    assert not left & {"adapter_config.json", "adapter_model.safetensors", "pytorch_model.bin"}


def test_a_refused_run_leaves_the_other_runs_files_alone(tmp_path, tok):
    """Skipped rows are listed in output_dir only once the run is known to own it."""
    out = tmp_path / "run"
    bad = PAIRS + [{"prompt": "p", "chosen": "", "rejected": " r"}]
    DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(out, max_steps=1, on_bad_rows="skip"), train_dataset=bad,
               processing_class=tok).train()
    before = (out / "skipped_rows.jsonl").read_text()
    assert json.loads(before)["reason"].endswith("field 'chosen': empty string")
    other = DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(out, max_steps=1, on_bad_rows="skip"),
                       train_dataset=[{"prompt": "q", "chosen": " a", "rejected": " a"}] + PAIRS, processing_class=tok)
    with pytest.raises(ConfigError, match="already holds a run"):
        other.train()
    assert (out / "skipped_rows.jsonl").read_text() == before


def test_a_reference_with_a_smaller_vocabulary_is_named(tmp_path, tok):
    from dpokit.errors import DpokitError

    small = tmp_path / "small"
    tiny_llama(vocab_size=128).save_pretrained(small)
    with pytest.raises(DpokitError, match=r"^ref_model: <list> row 1: field 'prompt_ids' has token id \d+ >= the "
                                          r"model's vocabulary size 128"):
        DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path / "run", ref_model_name_or_path=str(small)),
                   train_dataset=PAIRS, processing_class=tok)


def test_the_policy_object_cannot_be_its_own_reference(tmp_path, tok):
    m = tiny_llama(vocab_size=32000)
    with pytest.raises(ConfigError, match="model and ref_model are the same object"):
        DPOTrainer(m, ref_model=m, args=cfg(tmp_path / "run"), train_dataset=PAIRS, processing_class=tok)


# --------------------------------------------------------------------------------------------------------------------
# Non-finite guard


def _step_rows(trainer, step):
    """Row ids of the micro-batches of optimizer step `step` (1-based), from the trainer's own data order."""
    gas, epoch, flat = trainer.args.gradient_accumulation_steps, 0, []
    while len(flat) < step * gas:
        flat += [[trainer.train_examples[i].row for i in b] for b in trainer.schedule.epoch_batches(epoch)]
        epoch += 1
    return flat[(step - 1) * gas: step * gas]


def test_nan_loss_stops_naming_step_and_rows_and_keeps_the_last_checkpoint(tmp_path, tok):
    out = tmp_path / "run"
    t = DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(out, max_steps=5, save_steps=1), train_dataset=PAIRS,
                   processing_class=tok)
    # A hook poisons the hidden states of one training forward: the first micro-batch of step 3 (the policy runs
    # once per micro-batch; the frozen reference is another module).
    forwards = []

    def poison(module, inputs, output):
        if module.training:
            forwards.append(1)
            if len(forwards) == 5:
                return output * float("nan")

    t.model.get_input_embeddings().register_forward_hook(poison)
    with pytest.raises(NonFiniteError) as info:
        t.train()
    rows = sorted(_step_rows(t, 3)[0])
    message = str(info.value)
    assert message.startswith(f"non-finite loss (nan) at step 3 (rows {rows}: <list> row {rows[0] + 1}, ")
    assert message.endswith(f"stopped before the optimizer step; last good checkpoint: {out / 'checkpoint-2'}")
    assert "\n" not in message
    assert [s for s, _ in losses(out)] == [1, 2]
    # The last checkpoint loads as a model and resumes to the end once the data is fixed (here: the hook is gone).
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "checkpoint-2")
    resumed = DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(out, max_steps=5, save_steps=1,
                                                                 resume_from_checkpoint="latest"),
                         train_dataset=PAIRS, processing_class=tok)
    resumed.train()
    assert [s for s, _ in losses(out)] == [1, 2, 3, 4, 5]


def test_skip_skips_nonfinite_gradients_then_stops_after_the_limit(tmp_path, tok, capsys):
    out = tmp_path / "run"
    t = DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(out, max_steps=4, save_steps=0, on_nonfinite="skip",
                                                          max_nonfinite_steps=1), train_dataset=PAIRS,
                   processing_class=tok)
    weight = t.model.get_input_embeddings().weight
    backwards, snapshots = [], {}

    def poison_grad(grad):
        # Each epoch (3 micro-batches) is a step of two and a short step of one: steps 2 and 4 get a NaN gradient.
        backwards.append(1)
        return grad * float("nan") if len(backwards) in (3, 6) else grad

    weight.register_hook(poison_grad)
    real_step = t.training_step

    def spy(micro):
        snapshots[t.global_step] = weight.detach().clone()
        return real_step(micro)

    t.training_step = spy
    with pytest.raises(NonFiniteError, match=r"non-finite gradient norm \(nan\) at step 4 .*stopped before the "
                                             r"optimizer step \(1 steps skipped already, max_nonfinite_steps=1\)"):
        t.train()
    assert "non-finite gradient norm (nan) at step 2" in capsys.readouterr().out
    assert torch.equal(snapshots[1], snapshots[2])  # step 2 made no update
    assert not torch.equal(snapshots[2], snapshots[3])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_steps"] for r in records] == [0, 1, 1]
    assert "loss" not in records[1] and "loss" in records[2]


# --------------------------------------------------------------------------------------------------------------------
# Out of memory


@pytest.mark.parametrize("error", [
    RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 bytes."),
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
])
def test_out_of_memory_names_the_knobs(tmp_path, tok, error):
    t = DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path / "run"), train_dataset=PAIRS, processing_class=tok)

    def too_big(batch, train):
        raise error

    t.loss_and_metrics = too_big
    with pytest.raises(OutOfMemory) as info:
        t.train()
    assert str(info.value) == (
        "out of memory in training step 1 (per_device_train_batch_size=2, max_length=1024, "
        "gradient_checkpointing=False): lower per_device_train_batch_size and raise gradient_accumulation_steps to "
        "keep the effective batch, lower max_length, or set gradient_checkpointing=true")
    ev = DPOTrainer(tiny_llama(vocab_size=32000), args=cfg(tmp_path / "ev"), train_dataset=PAIRS, eval_dataset=PAIRS,
                    processing_class=tok)
    ev.loss_and_metrics = too_big
    with pytest.raises(OutOfMemory, match=r"out of memory during evaluation \(per_device_eval_batch_size=8, "
                                          r"max_length=1024\): lower per_device_eval_batch_size or max_length"):
        ev.evaluate()


# --------------------------------------------------------------------------------------------------------------------
# User mistakes on the command line: one line, exit code 2 (the table in docs/reliability.md)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, base_dir, pairs_file):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["dpo", f"model_name_or_path={base_dir}", f"train_file={pairs_file}", f"output_dir={out}",
                 "max_steps=2", "save_steps=1", "disable_tqdm=true", "per_device_train_batch_size=2"]) == 0
    return out


def _mistakes(tmp_path, base_dir, pairs_file, finished_run):
    small = tmp_path / "small-vocab"
    tiny_llama(vocab_size=128).save_pretrained(small)
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"prompt": [{"role": "user", "content": "Hi"}],
                                "chosen": [{"role": "assistant", "content": "Hello"}],
                                "rejected": [{"role": "assistant", "content": "Go"}]}) + "\n")
    common = [f"train_file={pairs_file}", "disable_tqdm=true", "max_steps=1"]
    model = f"model_name_or_path={base_dir}"
    o = lambda name: f"output_dir={tmp_path / name}"  # noqa: E731
    return {
        "unknown key": (["dpo", model, "lora_rank=8", *common], "unknown config key 'lora_rank' (did you mean 'lora_r'?)"),
        "bad value": (["dpo", model, "on_nonfinite=skp", *common],
                      "on_nonfinite: 'skp' is not one of stop, skip (did you mean 'skip'?)"),
        "model that cannot be loaded": (["dpo", f"model_name_or_path={empty}", f"tokenizer_name_or_path={base_dir}",
                                         o("m"), *common], f"cannot load model '{empty}'"),
        "no chat template": (["dpo", model, o("c"), f"train_file={chat}", "disable_tqdm=true"],
                             "needs a chat template, but the tokenizer has none; set chat_template"),
        "token ids beyond the vocabulary": (["dpo", f"model_name_or_path={small}", f"tokenizer_name_or_path={base_dir}",
                                             o("v"), *common], ">= the model's vocabulary size 128"),
        "empty after filtering": (["dpo", model, o("e"), "max_length=4", *common], "rows were dropped by truncation"),
        "incompatible options": (["dpo", model, o("i"), "loss_type=simpo", "precompute_ref_log_probs=true", *common],
                                 "precompute_ref_log_probs is set but the loss 'simpo' uses no reference model"),
        "output_dir holding a run": (["dpo", model, f"output_dir={finished_run}", *common], "already holds a run"),
        "resume from a missing checkpoint": (["dpo", model, o("r"), "--resume", str(tmp_path / "nope"), *common],
                                             "resume_from_checkpoint: no checkpoint directory"),
        "output_dir that is a file": (["dpo", model, f"output_dir={pairs_file}", *common],
                                      f"output_dir '{pairs_file}' exists and is not a directory"),
        "chat_template file that does not exist": (["dpo", model, o("t"), f"chat_template={tmp_path / 'chat.jinja'}",
                                                    *common], "is neither a Jinja template nor a file"),
        "TRL key dpokit cannot honour": (["dpo", model, o("h"), "push_to_hub=true", *common],
                                         "push_to_hub: 'true' is not supported: dpokit does not upload"),
        "unknown torch.compile backend": (["dpo", model, o("b"), "torch_compile=true", "torch_compile_backend=nope",
                                           *common], "torch_compile_backend: unknown 'nope'"),
        "resume with other settings": (["dpo", model, f"output_dir={finished_run}", "--resume", "max_steps=2",
                                        "save_steps=1", "per_device_train_batch_size=2", "disable_tqdm=true",
                                        f"train_file={pairs_file}", "beta=0.5"],
                                       "the config differs in beta (0.1 -> 0.5)"),
    }


def test_user_mistakes_are_one_line_errors_with_exit_code_2(tmp_path, base_dir, pairs_file, finished_run, capsys):
    for name, (argv, needle) in _mistakes(tmp_path, base_dir, pairs_file, finished_run).items():
        assert main(argv) == 2, name
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("dpokit dpo: error: ") and needle in err[0], (name, err)


def test_missing_pad_token_uses_eos_and_says_so(tmp_path, base_dir, pairs_file, capsys):
    assert main(["dpo", f"model_name_or_path={base_dir}", f"train_file={pairs_file}", f"output_dir={tmp_path / 'o'}",
                 "max_steps=1", "save_steps=0", "disable_tqdm=true"]) == 0
    assert "[dpokit] tokenizer has no pad token; using EOS '</s>' (id 2) for padding" in capsys.readouterr().out


def test_debug_shows_the_traceback(pairs_file):
    with pytest.raises(ConfigError, match="did you mean 'lora_r'"):
        main(["dpo", "--debug", "lora_rank=8", f"train_file={pairs_file}"])


def test_resume_flag_forms(tmp_path, finished_run, base_dir, pairs_file, capsys):
    """--resume (latest), --resume PATH and --resume=PATH all reach resume_from_checkpoint."""
    args = [f"model_name_or_path={base_dir}", f"train_file={pairs_file}", "max_steps=2", "save_steps=1",
            "disable_tqdm=true", "per_device_train_batch_size=2"]
    assert main(["dpo", f"output_dir={finished_run}", "--resume", *args]) == 0
    # The finished run's last step was checkpointed (as transformers does), so --resume finds it and has nothing to do.
    assert f"resumed from {finished_run / 'checkpoint-2'} at step 2" in capsys.readouterr().out
    for i, form in enumerate((["--resume", str(finished_run / "checkpoint-1")],
                              [f"--resume={finished_run / 'checkpoint-1'}"])):
        assert main(["dpo", f"output_dir={tmp_path / str(i)}", *form, *args]) == 0
        assert "resumed from" in capsys.readouterr().out
