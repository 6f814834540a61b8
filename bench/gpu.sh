#!/usr/bin/env bash
# dpokit's GPU checks and measurements, in stages that each fit one command of at most 10 minutes on the GPU machine
# (one H200: about 790 TFLOP/s dense bf16 measured, 139 GiB; torch 2.11, transformers 5.17, accelerate 1.15 and peft
# installed; no network). It runs from the source tree (PYTHONPATH=src), with the packages that machine lacks brought
# as wheels in .whl/.
#
# Once, on the CPU machine, in the repository root:
#   bash bench/gpu.sh prepare
# downloads, with --no-deps, the manylinux x86_64 CPython 3.12 wheels of exactly what the GPU machine lacks (TRL 1.16
# and the parts of its requirements not installed there: datasets, dill, multiprocess; liger-kernel; bitsandbytes)
# into .whl/ (about 45 MB), copies ../shared into shared/ (the HH-RLHF pairs and the Llama-2 tokenizer travel with the
# tree from there), and adds both folders to git's exclude file.
#
# Then one device call per stage, carrying the wheels, e.g.
#   run(command="bash bench/gpu.sh check", carry=[".whl"], timeout_s=600)
# Every stage prints the machine's versions first (GPU, driver, CUDA, python, torch, transformers, accelerate, peft,
# trl, liger-kernel, bitsandbytes), writes them to $OUT/versions.json, and its result as JSON under $OUT.
#
# Stages sized for the GPU machine (about 4 and 5 minutes):
#   check     bench/gpu_checks.py -> $OUT/gpu-checks.json: the packed attention kernel on CUDA (Flash varlen against
#             the sdpa buckets and a float32 reference, forward and backward); through DPOTrainer in bf16, packed
#             (Flash varlen), shared prompt and token budget, torch_compile with inductor, and QLoRA (4-bit, when
#             bitsandbytes is present), each against the padded eager run
#   llama-1b  the headline table -> $OUT/llama-1b.json: dpokit vs TRL's default vs TRL with use_liger_kernel on the
#             Llama-3.2-1B shape, each TRL side at one micro-batch (TRL_MB, LIGER_MB: the fastest found by the
#             `micro-batches` stage; 8 and 16 until measured), STEPS timed steps (default 6) after 2 warm-up steps
# Longer stages (each may need a call of its own and more device time than a session has):
#   micro-batches  TRL and TRL+Liger at micro-batches 4, 8 and 16 (2 timed steps): the fastest of each side, for
#                  TRL_MB and LIGER_MB (an out-of-memory size is recorded, not fatal)
#   long, long-max synthetic 8K and 32K pairs at one pair per step; the longest sequence each side trains
#   tinyllama, qwen the other GPU presets
# Extra arguments go to `dpokit bench` (e.g. `bash bench/gpu.sh llama-1b --steps 4`).
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: bash bench/gpu.sh prepare|check|llama-1b|micro-batches|long|long-max|tinyllama|qwen [bench args]}
shift

if [ "$stage" = prepare ]; then
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")"
  for path in /.whl/ /shared/; do grep -qxF "$path" "$exclude" 2>/dev/null || echo "$path" >> "$exclude"; done
  [ -d shared ] || cp -RL ../shared shared  # -L: ../shared may be a link, and a link travels only as a link
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 liger-kernel==0.8.5 bitsandbytes==0.50.2
  du -sh .whl shared
  exit 0
fi

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PWD/src:/tmp/site"
else
  export PYTHONPATH="$PWD/src"
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
out=${OUT:-bench/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 - "$out/versions.json" <<'EOF'
import importlib.metadata as md, json, platform, sys

import torch

versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "capability": ".".join(map(str, torch.cuda.get_device_capability())) if torch.cuda.is_available() else None}
for name in ("transformers", "accelerate", "peft", "trl", "datasets", "liger-kernel", "bitsandbytes", "triton"):
    try:
        versions[name] = md.version(name)
    except md.PackageNotFoundError:
        versions[name] = None
print(" ".join(f"{k} {v}" for k, v in versions.items()), flush=True)
open(sys.argv[1], "w").write(json.dumps(versions, indent=2))
EOF
data=(--tokenizer shared/tokenizers/llama2 --data shared/data/hh-rlhf-harmless-test.jsonl.gz --peak-tflops 790)
case "$stage" in
  check) python3 bench/gpu_checks.py "$out/gpu-checks.json" ;;
  llama-1b) python3 -m dpokit.bench --preset llama-1b --trl-liger --steps "${STEPS:-6}" \
              --trl-micro-batches "${TRL_MB:-8}" --trl-liger-micro-batches "${LIGER_MB:-16}" "${data[@]}" \
              --output "$out/llama-1b.json" "$@" ;;
  micro-batches) python3 -m dpokit.bench --preset llama-1b --trl-liger --steps 2 --trl-micro-batches 4 8 16 \
                   "${data[@]}" --output "$out/micro-batches.json" "$@" ;;
  long) python3 -m dpokit.bench --preset long "${data[@]}" --output "$out/long.json" "$@" ;;
  long-max) python3 -m dpokit.bench --preset long --find-max-length --steps 1 "${data[@]}" --output "$out/long-max.json" "$@" ;;
  tinyllama) python3 -m dpokit.bench --preset tinyllama-1.1b "${data[@]}" --output "$out/tinyllama.json" "$@" ;;
  qwen) python3 -m dpokit.bench --preset qwen-0.5b "${data[@]}" --output "$out/qwen.json" "$@" ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
