"""GPU-only checks for a CUDA machine (run by `bench/gpu.sh check`): the paths CPU CI cannot reach.

Through `DPOTrainer` on a small Llama in bf16, 6 steps on HH-RLHF pairs, each variant against the padded eager run:
- padding-free packing (`padding_free`), with shared prompt, with a token budget: on CUDA in bf16 the packed
  attention runs torch's Flash `varlen_attn` (counted, so a silent fallback to the sdpa buckets shows);
- `torch_compile` with the inductor backend, padded and packed.
Per variant: losses and logps/chosen of every step, their largest relative difference from the padded run, wall
time, peak memory and the number of varlen attention calls. Writes JSON to the path given; exits 1 when a variant's
first-step numbers differ beyond bf16 tolerance (later steps drift apart as bf16 rounding compounds, so they are
reported, not judged).
"""

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dpokit import DPOConfig, DPOTrainer, packing  # noqa: E402
from dpokit.data import load_rows  # noqa: E402

SHARED = ROOT / "shared" if (ROOT / "shared").is_dir() else ROOT.parent / "shared"
VARIANTS = {
    "padded": {},
    "packed": {"padding_free": True},
    "packed_shared_prompt": {"padding_free": True, "share_prompt": True},
    "packed_token_budget": {"padding_free": True, "share_prompt": True, "token_budget": 4096},
    "compiled_padded": {"torch_compile": True},
    "compiled_packed": {"padding_free": True, "share_prompt": True, "torch_compile": True},
}
FIRST_STEP_RTOL = 2e-2  # bf16 autocast: packed and padded round differently


def small_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                                        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                                        bos_token_id=1, eos_token_id=2))


def main(out_path: str) -> int:
    from transformers import AutoTokenizer

    assert torch.cuda.is_available(), "run this on a CUDA machine"
    tok = AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / "llama2"))
    rows, _ = load_rows(str(SHARED / "data" / "hh-rlhf-harmless-test.jsonl.gz"))
    rows = list(rows[:96])
    calls = {"varlen": 0}
    available = packing._varlen_available

    def counted(query):
        used = available(query)
        calls["varlen"] += int(used)
        return used

    packing._varlen_available = counted
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name, extra in VARIANTS.items():
        calls["varlen"] = 0
        torch.cuda.reset_peak_memory_stats()
        args = DPOConfig(output_dir=f"/tmp/dpokit-gpu-{name}", overwrite_output_dir=True, bf16=True, max_steps=6,
                         per_device_train_batch_size=16, learning_rate=1e-4, logging_steps=1, save_steps=0,
                         disable_tqdm=True, max_length=512, seed=0, **extra)
        t0 = time.perf_counter()
        trainer = DPOTrainer(small_llama(), args=args, train_dataset=rows, processing_class=tok)
        trainer.train()
        torch.cuda.synchronize()
        recs = [json.loads(line) for line in (Path(args.output_dir) / "metrics.jsonl").read_text().splitlines()]
        recs = [r for r in recs if "loss" in r]
        results[name] = {"config": extra, "losses": [r["loss"] for r in recs],
                         "logps_chosen": [r["logps/chosen"] for r in recs], "seconds": time.perf_counter() - t0,
                         "peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20,
                         "varlen_calls": calls["varlen"]}
        print(f"{name}: {results[name]}", flush=True)
    failures = []
    base = results["padded"]
    for name in VARIANTS:
        r = results[name]
        rel = lambda a, b: abs(a - b) / max(abs(b), 1e-12)  # noqa: E731
        r["max_rel_diff_losses"] = max(rel(a, b) for a, b in zip(r["losses"], base["losses"]))
        r["max_rel_diff_logps_chosen"] = max(rel(a, b) for a, b in zip(r["logps_chosen"], base["logps_chosen"]))
        first = max(rel(r["losses"][0], base["losses"][0]), rel(r["logps_chosen"][0], base["logps_chosen"][0]))
        if first > FIRST_STEP_RTOL:
            failures.append(f"{name}: first step differs from padded by {first:.2e}")
        if r["config"].get("padding_free") and r["varlen_calls"] == 0:
            failures.append(f"{name}: packed attention never ran varlen_attn on CUDA bf16")
    results["failures"] = failures
    Path(out_path).write_text(json.dumps(results, indent=2))
    print("\n".join(failures) or "all variants agree with the padded run at the first step", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "gpu-checks.json"))
