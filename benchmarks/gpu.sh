#!/bin/bash
# Check and time the Triton step on a CUDA machine in one short run (about 5-6 minutes on an
# H200: correctness of every kernel variant, then a sweep of variants/precisions/blocks/warps/
# register caps capped at 200 s, then the fastest for RNNprop and bf16 state). Results go to
# ${OUT:-.}/gpu_check.json and gpu_check.log; run it with a 9-minute limit.
set -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-.}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv
python3 benchmarks/gpu_check.py --sweep-budget 200 --out "$out/gpu_check.json" 2>&1 \
    | tee "$out/gpu_check.log"
python3 -m pytest tests/test_optimizer.py tests/test_kernels.py -q -x -k "cuda or triton" \
    -p no:cacheprovider 2>&1 | tail -15
