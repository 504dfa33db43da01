#!/usr/bin/env bash
# The final GPU round of a kernel version: the GPU suite with GPU tests required, then the
# benchmark grid of the issue targets (fp16/bf16, d 64/128, n 1024-16384, causal and not,
# forward and forward+backward) beside SDPA flash and cuDNN in one run.
#   OUT=dir NAME=h200_vX_grid bash benchmarks/gpu_grid.sh
set -uo pipefail
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"; NAME=${NAME:-h200_grid}
[ "${SUITE:-1}" = 1 ] && TEST_TIMEOUT=${TEST_TIMEOUT:-260} TAIL=6 bash "$(dirname "$0")/gpu_check.sh" tests/test_gpu_forward.py tests/test_gpu_backward.py tests/test_gpu_torch.py tests/test_gpu_graphs.py tests/test_gpu_sm80_path.py tests/test_torch_ops.py
timeout ${BENCH_TIMEOUT:-300} python3 -m cupy_cosine_attn bench --dtype fp16,bf16 --d 64,128 \
  --n ${GRID_N:-1024,2048,4096,8192,16384} --causal both --mode fwd,fwdbwd \
  --contenders cupy-cosine-attn,sdpa-flash,sdpa-cudnn --no-progress \
  --json "$OUT/$NAME.json" --csv "$OUT/$NAME.csv" --plot "$OUT/$NAME.png" > "$OUT/$NAME.txt" 2>&1
echo "bench exit $?"; tail -3 "$OUT/$NAME.txt"
