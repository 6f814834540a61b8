"""Multi-process training: 2 CPU processes (torchrun, gloo, DDP) must equal 1 process with the same global batch.

Each case launches `torchrun --nproc_per_node 2 -m dpokit dpo ...` and `python -m dpokit dpo ...` (per-device batch
doubled) on a tiny saved model and compares the logged losses, the evaluation metrics and the final weights. The data
(9 pairs, 4 per global micro-batch) ends each epoch with a 1-pair micro-batch, so one rank runs a zero-weight filler
pass; gradient accumulation 2 exercises DDP's no_sync.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import LLAMA2_TOKENIZER, tiny_llama
from dpokit import distributed as dist

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["sunny", "cold", "bread", "nothing", "four", "five", "hello", "away", "tea", "rain", "music", "noise"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("dist")
    tiny_llama(vocab_size=32000, seed=0).save_pretrained(d / "model")
    AutoTokenizer.from_pretrained(LLAMA2_TOKENIZER).save_pretrained(d / "model")
    for name, n in (("train", 9), ("eval", 5)):
        with (d / f"{name}.jsonl").open("w") as f:
            for i in range(n):
                # Different lengths, so the ranks' parts are padded differently from the 1-process batch.
                chosen = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(1 + i % 4))
                f.write(json.dumps({"prompt": f"Question {i}: say something{'!' * (i % 3)}",
                                    "chosen": " " + chosen + ".", "rejected": " " + WORDS[(i * 5) % 12]}) + "\n")
    return d


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(assets: Path, out: Path, nproc: int, per_device: int, engine: str = "ddp",
           **overrides) -> subprocess.CompletedProcess:
    args = dict(model_name_or_path=assets / "model", train_file=assets / "train.jsonl",
                eval_file=assets / "eval.jsonl", output_dir=out, per_device_train_batch_size=per_device,
                per_device_eval_batch_size=2, gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-3,
                logging_steps=1, save_steps=0, disable_tqdm=True, seed=3, max_length=64)
    args.update(overrides)
    cli = ["-m", "dpokit", "dpo", *[f"{k}={v}" for k, v in args.items()]]
    if nproc == 1:
        cmd = [sys.executable, *cli]
    elif engine in ("fsdp", "zero2", "zero3"):
        # The way users launch it: accelerate's launcher with the shipped config (FSDP2, DeepSpeed ZeRO-2/3), here on
        # CPU over gloo.
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "examples" / "accelerate" / f"{engine}.yaml"), "--num_processes", str(nproc),
               "--main_process_port", str(_free_port()), *cli]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cli]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1",
           "DPOKIT_CACHE_DIR": str(out.parent / f"cache-{out.name}")}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out: Path) -> dict:
    name = "adapter_model.safetensors" if (out / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(str(out / name))


CASES = {  # name: (engine, overrides)
    "plain": ("ddp", {}),
    "precomputed_ref": ("ddp", {"precompute_ref_log_probs": "true"}),
    "lora": ("ddp", {"use_peft": "true", "lora_dropout": 0.0}),
    # Packed micro-batches of at most 48 tokens: each rank packs its share of the step's 8 pairs into a few of them,
    # and the two processes run other splits (and fillers) than the one process does.
    "token_budget": ("ddp", {"padding_free": "true", "share_prompt": "true", "token_budget": 48}),
    # FSDP2 over gloo: parameters, gradients and optimizer state sharded over the two processes.
    "fsdp": ("fsdp", {}),
    "fsdp_precomputed_ref": ("fsdp", {"precompute_ref_log_probs": "true"}),
    "fsdp_lora": ("fsdp", {"use_peft": "true", "lora_dropout": 0.0}),
    # DeepSpeed ZeRO-2 / ZeRO-3 over gloo (accelerate launch with examples/accelerate/zero{2,3}.yaml): the engine
    # clips and steps inside the last micro-batch's backward, with dpokit's loss scaling, schedule and clipping.
    "zero2": ("zero2", {}),
    "zero3": ("zero3", {}),
    "zero3_lora": ("zero3", {"use_peft": "true", "lora_dropout": 0.0}),
    "zero3_precomputed_ref": ("zero3", {"precompute_ref_log_probs": "true"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_equal_one_with_the_same_global_batch(assets, tmp_path, case):
    engine, overrides = CASES[case]
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed")
    one, two = tmp_path / "one", tmp_path / "two"
    launch(assets, one, nproc=1, per_device=4, **overrides)
    # The plain, FSDP and DeepSpeed cases also checkpoint at step 2, to resume them below.
    resumed = case in ("plain", "fsdp", "fsdp_lora", "zero2", "zero3", "zero3_lora")
    run = launch(assets, two, nproc=2, per_device=2, engine=engine, **overrides, save_steps=2 if resumed else 0)
    name = "deepspeed" if engine.startswith("zero") else engine
    wrapper = {"fsdp": "FSDPPolicyCall", "deepspeed": "DeepSpeedEngine"}.get(name, "DistributedDataParallel")
    assert f"2 processes on cpu, engine {name} ({wrapper})" in run.stdout
    a, b = metrics(one), metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 3]
    for ra, rb in zip(a, b):
        for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "grad_norm", "eval/loss",
                    "eval/logps/rejected"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), (ra["step"], key)
    # The training really moved the weights (else equality would prove nothing).
    assert a[0]["grad_norm"] > 0 and a[0]["loss"] != a[-2]["loss"]
    wa, wb = weights(one), weights(two)
    assert set(wa) == set(wb)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6, msg=k)
    # Only the first process prints dpokit's notices.
    assert run.stdout.count("[dpokit] tokenizer has no pad token") == 1
    if resumed:
        # The data position counts global micro-batches: the same 4 per micro-step from 1 process x 4 resumes exactly,
        # and checkpoints hold full weights and a full optimizer state keyed by parameter name (FSDP's shards and
        # DeepSpeed's ZeRO partitions are gathered on save and scattered on load), so a run resumes on another engine
        # or number of processes.
        resumes = [(1, 4, "ddp")] + ([(2, 2, engine)] if engine != "ddp" else [])
        for nproc, per_device, how in resumes:
            launch(assets, two, nproc=nproc, per_device=per_device, engine=how, **overrides,
                   resume_from_checkpoint=str(two / "checkpoint-2"))
            assert [r.get("loss", r.get("eval/loss")) for r in metrics(two)] == \
                pytest.approx([r.get("loss", r.get("eval/loss")) for r in b], rel=1e-4), (nproc, how)
            for k, v in weights(two).items():
                torch.testing.assert_close(v, wa[k], rtol=1e-4, atol=1e-6, msg=f"{nproc} x {how}: {k}")


@pytest.mark.parametrize("overrides, message", [
    ({"on_nonfinite": "skip"}, "on_nonfinite=skip is not supported under DeepSpeed"),
])
def test_deepspeed_refuses_what_it_cannot_do(assets, tmp_path, overrides, message):
    pytest.importorskip("deepspeed")
    with pytest.raises(AssertionError) as failed:
        launch(assets, tmp_path / "out", nproc=2, per_device=2, engine="zero2", **{"save_steps": 0, **overrides})
    assert message in str(failed.value)


def test_rank_parts_are_disjoint_balanced_and_in_dataset_order():
    items, sizes = [10, 11, 12, 13, 14, 15, 16], [5, 50, 7, 40, 6, 30, 9]
    parts = [dist.rank_part(items, sizes, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == items
    assert sorted(len(p) for p in parts) == [2, 2, 3]
    assert all(p == sorted(p) for p in parts)
    loads = [sum(sizes[items.index(i)] for i in p) for p in parts]
    assert max(loads) - min(loads) <= 50  # the three long examples land on three different ranks
    assert sorted(max(p, key=lambda i: sizes[items.index(i)]) for p in parts) == [11, 13, 15]
    assert dist.rank_part([7], [3], 1, 2) == []  # an empty part: that rank runs a zero-weight filler
