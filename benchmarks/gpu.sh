#!/bin/bash
# Check and time the Triton step on a CUDA machine in one short run (about 3 minutes on an
# H200). Results go to ${OUT:-.}/gpu_check.json and gpu_check.log.
set -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-.}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv
python3 benchmarks/gpu_check.py --out "$out/gpu_check.json" 2>&1 | tee "$out/gpu_check.log"
python3 -m pytest tests/test_optimizer.py tests/test_kernels.py -q -x -k "cuda or triton" \
    -p no:cacheprovider 2>&1 | tail -15
