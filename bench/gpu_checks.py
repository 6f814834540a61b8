"""GPU-only checks for a CUDA machine (`bash bench/gpu.sh check`): the paths CPU CI runs only against stand-ins.

1. kernel: dpokit's packed attention function on CUDA in bf16 (a Llama-3.2-1B head shape: 32 query heads, 8 K/V
   heads, head_dim 64; segments of lengths 1 to 64, a few long ones and an empty tail), with the kernel dpokit chose
   for this torch (Flash varlen_attn) and with the sdpa buckets, each against a float32 per-segment reference,
   forward and backward; and their times.
2. trainer: `DPOTrainer` on a small Llama (GQA) in bf16, 6 steps on HH-RLHF pairs, each variant against its
   baseline's first step: packed (`padding_free`, Flash varlen), with shared prompt, with a token budget, and
   `torch_compile` with inductor (padded and packed) against the padded eager run; QLoRA (4-bit NF4 base, LoRA
   adapters; packed and padded, when bitsandbytes is installed) packed against padded, its first loss log 2.
Per variant: losses and logps/chosen of every step, wall time, peak memory, the kernel chosen and how many
varlen_attn calls ran. The JSON is rewritten after every section, so a run stopped at its time limit still leaves
what it measured. Exits 1 when a check fails (first-step numbers beyond bf16 tolerance, the packed path not on Flash,
a non-finite loss); later steps drift apart as bf16 rounding compounds, so they are reported, not judged.
"""

import functools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dpokit import DPOConfig, DPOTrainer, packing  # noqa: E402
from dpokit.data import load_rows  # noqa: E402

SHARED = ROOT / "shared" if (ROOT / "shared").is_dir() else ROOT.parent / "shared"
FIRST_STEP_RTOL = 2e-2  # bf16 autocast: packed and padded round differently
BUDGET_S = float(os.environ.get("CHECK_BUDGET_S", 540))  # stop starting variants after this (a call has 600 s)
STEPS = int(os.environ.get("CHECK_STEPS", 6))  # optimizer steps per trainer variant
QLORA = {"use_peft": True, "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "use_bnb_nested_quant": True,
         "dtype": "bfloat16", "lora_r": 16, "lora_alpha": 32}
VARIANTS = {  # name: (settings, the variant whose first step it must match)
    "padded": ({}, None),
    "packed": ({"padding_free": True}, "padded"),
    "packed_shared_prompt": ({"padding_free": True, "share_prompt": True}, "padded"),
    "packed_token_budget": ({"padding_free": True, "share_prompt": True, "token_budget": 4096}, "padded"),
    "compiled_padded": ({"torch_compile": True}, "padded"),
    "compiled_packed": ({"padding_free": True, "share_prompt": True, "torch_compile": True}, "padded"),
    "qlora_padded": (QLORA, None),
    "qlora_packed": ({**QLORA, "padding_free": True, "share_prompt": True}, "qlora_padded"),
}
START = time.perf_counter()


def write(results, out_path):
    Path(out_path).write_text(json.dumps(results, indent=2))


# --------------------------------------------------------------------------------------------------------------------
# 1. The packed attention kernel


def kernel_check() -> dict:
    torch.manual_seed(0)
    lengths = list(range(1, 65)) + [300, 517, 1024, 0]
    layout, n = packing.PackedLayout.of_segments(lengths, "cuda"), sum(lengths)
    scale = 64 ** -0.5
    base = [torch.randn(1, h, n, 64, device="cuda") for h in (32, 8, 8)]
    cotangent = torch.randn(1, n, 32, 64, device="cuda")

    ref_in = [t.clone().requires_grad_() for t in base]
    ref, start = [], 0
    for length in lengths:
        if length:
            seg = [t[:, :, start:start + length] for t in ref_in]
            ref.append(F.scaled_dot_product_attention(*seg, is_causal=True, scale=scale,
                                                      enable_gqa=True).transpose(1, 2)[0])
        start += length
    ref = torch.cat(ref)[None]
    ref.backward(cotangent)

    module = torch.nn.Module().eval()
    result = {}
    for name in ("chosen", "sdpa_buckets"):
        real = packing.flash_device
        if name == "sdpa_buckets":
            packing.flash_device = lambda query: (True, "forced, for comparison")
            saved, packing.KERNELS = packing.KERNELS, {}
        inputs = [t.to(torch.bfloat16).requires_grad_() for t in base]

        def step():
            out, _ = packing.packed_attention_forward(module, *inputs, None, scaling=scale,
                                                      **{packing.LAYOUT_KWARG: layout})
            out.backward(cotangent.to(out.dtype))
            return out

        out = step()
        errors = {"out": (out.float() - ref).abs().max().item()}
        errors.update({f"grad_{k}": (t.grad.float() - r.grad).abs().max().item()
                       for k, t, r in zip("qkv", inputs, ref_in)})
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            step()
        torch.cuda.synchronize()
        kernel = next(iter(packing.KERNELS.values()))
        result[name] = {"kernel": "flash varlen_attn" if kernel else "sdpa buckets", "max_abs_error": errors,
                        "forward_backward_ms": (time.perf_counter() - t0) * 100}
        packing.flash_device = real
        if name == "sdpa_buckets":
            packing.KERNELS = saved
    print(f"kernel: {result}", flush=True)
    return result


def kernel_failures(r: dict) -> list:
    failures = []
    if r["chosen"]["kernel"] != "flash varlen_attn":
        failures.append("kernel: the packed path did not choose Flash varlen_attn on this GPU (see its info line)")
    for key, err in r["chosen"]["max_abs_error"].items():
        bound = 2 * r["sdpa_buckets"]["max_abs_error"][key] + 1e-3  # both bf16; Flash no worse than sdpa
        if not err <= bound:
            failures.append(f"kernel: {key} error {err:.3g} against the float32 reference, more than {bound:.3g}")
    return failures


# --------------------------------------------------------------------------------------------------------------------
# 2. Through DPOTrainer


def small_llama_dir() -> str:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = "/tmp/dpokit-gpu-model"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                                 bos_token_id=1, eos_token_id=2)).save_pretrained(path)
    AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / "llama2")).save_pretrained(path)
    return path


def counting_varlen(calls: dict) -> None:
    """Count the varlen_attn calls the packed path makes (the wrapper keeps torch's signature for dpokit to read)."""
    version, fn = packing.torch_varlen()
    if fn is None:
        return

    @functools.wraps(fn)
    def counted(*args, **kwargs):
        calls["varlen"] += 1
        return fn(*args, **kwargs)

    packing.torch_varlen = lambda: (version, counted)


def run_variant(name: str, extra: dict, model: str, rows: list, calls: dict) -> dict:
    calls["varlen"] = 0
    torch.cuda.reset_peak_memory_stats()
    args = DPOConfig(output_dir=f"/tmp/dpokit-gpu-{name}", overwrite_output_dir=True, bf16=True, max_steps=STEPS,
                     per_device_train_batch_size=16, learning_rate=1e-4, logging_steps=1, save_steps=0,
                     disable_tqdm=True, max_length=512, seed=0, **extra)
    t0 = time.perf_counter()
    DPOTrainer(model, args=args, train_dataset=rows).train()
    torch.cuda.synchronize()
    recs = [json.loads(line) for line in (Path(args.output_dir) / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "loss" in r]
    return {"config": extra, "losses": [r["loss"] for r in recs], "logps_chosen": [r["logps/chosen"] for r in recs],
            "seconds": time.perf_counter() - t0, "peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20,
            "varlen_calls": calls["varlen"],
            "kernels": {k: ("flash varlen_attn" if v else "sdpa buckets") for k, v in packing.KERNELS.items()}}


def variant_failures(name: str, r: dict, base: dict) -> list:
    failures = []
    rel = lambda a, b: abs(a - b) / max(abs(b), 1e-12)  # noqa: E731
    if not all(math.isfinite(x) for x in r["losses"] + r["logps_chosen"]):
        failures.append(f"{name}: a non-finite loss or log-prob")
    if base is not None:
        r["max_rel_diff_losses"] = max(rel(a, b) for a, b in zip(r["losses"], base["losses"]))
        r["max_rel_diff_logps_chosen"] = max(rel(a, b) for a, b in zip(r["logps_chosen"], base["logps_chosen"]))
        first = max(rel(r["losses"][0], base["losses"][0]), rel(r["logps_chosen"][0], base["logps_chosen"][0]))
        if first > FIRST_STEP_RTOL:
            failures.append(f"{name}: first step differs from its baseline by {first:.2e}")
    if r["config"].get("padding_free") and r["varlen_calls"] == 0:
        failures.append(f"{name}: packed attention never ran varlen_attn on CUDA bf16")
    if r["config"].get("load_in_4bit") and abs(r["losses"][0] - math.log(2)) > 1e-3:
        failures.append(f"{name}: first QLoRA loss {r['losses'][0]} is not log 2 (the policy starts as the reference)")
    return failures


def main(out_path: str) -> int:
    assert torch.cuda.is_available(), "run this on a CUDA machine"
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
               "skipped": {}}
    results["kernel"] = kernel_check()
    failures = kernel_failures(results["kernel"])
    results["failures"] = failures
    write(results, out_path)

    rows, _ = load_rows(str(SHARED / "data" / "hh-rlhf-harmless-test.jsonl.gz"))
    rows = list(rows[:96])
    model = small_llama_dir()
    calls = {"varlen": 0}
    counting_varlen(calls)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        bitsandbytes = None
    for name, (extra, base) in VARIANTS.items():
        if extra.get("load_in_4bit") and bitsandbytes is None:
            results["skipped"][name] = "bitsandbytes is not installed"
        elif time.perf_counter() - START > BUDGET_S:
            results["skipped"][name] = f"out of time ({BUDGET_S:.0f} s)"
        elif base is not None and base not in results:
            results["skipped"][name] = f"its baseline {base} did not run"
        else:
            results[name] = run_variant(name, extra, model, rows, calls)
            failures += variant_failures(name, results[name], results.get(base) if base else None)
            print(f"{name}: {results[name]}", flush=True)
        write(results, out_path)
    for name, why in results["skipped"].items():
        print(f"{name}: skipped, {why}", flush=True)
    print("\n".join(failures) or "all checks pass", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "gpu-checks.json"))
