#!/usr/bin/env bash
# The GPU measurements of issue #5 (performance), in stages that each fit one device call (10 minutes).
#
# Once, on the CPU machine, in the repository root:
#   echo /.whl/ >> .git/info/exclude; echo /shared/ >> .git/info/exclude; cp -r ../shared shared
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 liger-kernel
# (the GPU machine has torch, transformers, accelerate, peft, pyarrow, pandas and xxhash, not these).
# Then one device call per stage, carrying the wheels (shared/ travels by itself):
#   run(command="bash bench/gpu.sh STAGE", carry=[".whl"])
# Stages:
#   check     bench/gpu_checks.py: Flash varlen packing and torch_compile (inductor) against the padded eager run
#   llama-1b  the headline table: dpokit vs TRL default vs TRL + use_liger_kernel (MFU against 800 TFLOP/s)
#   long      synthetic 8K and 32K pairs at one pair per step, both sides
#   long-max  the longest sequence each side trains at one pair per step (doubling until out of memory)
#   tinyllama, qwen   the other GPU presets
# Extra arguments go to `dpokit bench` (e.g. --steps 5 --trl-micro-batches 8 16 to fit a call).
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: bash bench/gpu.sh check|llama-1b|long|long-max|tinyllama|qwen [bench args]}
shift
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PWD/src:/tmp/site"
else
  export PYTHONPATH="$PWD/src"
fi
export PYTHONUNBUFFERED=1
out=${OUT:-bench/out}
mkdir -p "$out"
data=(--tokenizer shared/tokenizers/llama2 --data shared/data/hh-rlhf-harmless-test.jsonl.gz --peak-tflops 800)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c 'import torch, transformers, accelerate; print("torch", torch.__version__, "transformers", transformers.__version__, "accelerate", accelerate.__version__)'
case "$stage" in
  check) python3 bench/gpu_checks.py "$out/gpu-checks.json" ;;
  llama-1b) python3 -m dpokit.bench --preset llama-1b --trl-liger "${data[@]}" --output "$out/llama-1b.json" "$@" ;;
  long) python3 -m dpokit.bench --preset long "${data[@]}" --output "$out/long.json" "$@" ;;
  long-max) python3 -m dpokit.bench --preset long --find-max-length --steps 1 "${data[@]}" --output "$out/long-max.json" "$@" ;;
  tinyllama) python3 -m dpokit.bench --preset tinyllama-1.1b "${data[@]}" --output "$out/tinyllama.json" "$@" ;;
  qwen) python3 -m dpokit.bench --preset qwen-0.5b "${data[@]}" --output "$out/qwen.json" "$@" ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
