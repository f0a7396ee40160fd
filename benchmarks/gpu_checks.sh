#!/usr/bin/env bash
# The GPU checks in one run on a lent GPU machine (about 8 minutes at most on one H100/H200):
#   1. tests/kernels/test_cuda.py (every GPU backend against the dense reference, outputs
#      and gradients, soft-capping and sinks) and the FSDP2 test (skipped with one GPU);
#   2. benchmarks/real_model_speed.py through `flex` in bfloat16, on SmolLM2-135M's
#      architecture (benchmarks/smollm2-135m/config.json) with random weights: the machine
#      lacks the GGUF, and a call costs the same whatever the weights.
# It uses the machine's own torch and transformers with longswap from src/ (nothing is
# installed), and prints their versions first.
#
#   bash benchmarks/gpu_checks.sh [OUT]    # logs and JSON in OUT (default: $OUT, or /tmp/gpu-checks)
set -uo pipefail
out=${1:-${OUT:-/tmp/gpu-checks}}
mkdir -p "$out"
export PYTHONPATH="$PWD/src:$PWD" PYTHONUNBUFFERED=1
python3 - <<'PY' 2>&1 | tee "$out/versions.txt"
import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
PY
status=0
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_cuda.py \
    tests/train/test_distributed.py::test_fsdp2_on_gpus_shards_and_equals_one_process \
    2>&1 | tee "$out/tests.log" || status=1
timeout 270 python3 benchmarks/real_model_speed.py --device cuda --dtypes bfloat16 \
    --backend flex --random-weights --model benchmarks/smollm2-135m \
    --lengths 8192,16384,32768 --forward-only 65536 --train-lengths 8192,16384 \
    --full-lengths 8192 --repeats 3 --train-repeats 3 --long-repeats 3 \
    --out "$out/real_model_speed-gpu.json" 2>&1 | tee "$out/speed.log" || status=1
exit $status
