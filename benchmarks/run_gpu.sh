#!/usr/bin/env bash
# On a CUDA machine with torch and triton installed: GPU tests, kernel benchmark, quickstart.
# Logs go to $OUT (or ./gpu-logs).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-logs}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$out/env.txt"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a "$out/env.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest -m gpu -q -x -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.txt" | tail -30
fi
python3 benchmarks/kernels.py "$@" 2>&1 | tee "$out/kernels.txt"
python3 examples/quickstart.py 2>&1 | tee "$out/quickstart.txt"
