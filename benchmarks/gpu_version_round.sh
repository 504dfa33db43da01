#!/usr/bin/env bash
# The closing GPU round of a kernel version, in order of importance (each step under its own
# timeout, so one device call holds them all): the GPU suite with GPU tests required, the
# benchmark grid of the issue targets beside SDPA flash and cuDNN (gpu_grid.sh's cases),
# compute-sanitizer memcheck and racecheck, then EXTRA ("name|cli args") benchmark runs.
#   OUT=dir NAME=h200_vX_grid EXTRA='h200_vX_d256|--dtype fp16,bf16 --d 256 ...' bash benchmarks/gpu_version_round.sh
set -uo pipefail
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"; NAME=${NAME:-h200_grid}
here="$(dirname "$0")"
TEST_TIMEOUT=${TEST_TIMEOUT:-220} TAIL=4 bash "$here/gpu_check.sh" tests/test_gpu_forward.py tests/test_gpu_backward.py \
  tests/test_gpu_torch.py tests/test_gpu_graphs.py tests/test_gpu_sm80_path.py tests/test_torch_ops.py
SUITE=0 BENCH_TIMEOUT=${GRID_TIMEOUT:-150} NAME=$NAME bash "$here/gpu_grid.sh"
for tool in memcheck racecheck; do
  timeout ${SAN_TIMEOUT:-100} compute-sanitizer --tool $tool --error-exitcode 3 python3 benchmarks/sanitize_check.py > "$OUT/sanitizer_$tool.txt" 2>&1
  echo "compute-sanitizer $tool exit $?"; tail -2 "$OUT/sanitizer_$tool.txt"
done
while IFS='|' read -r name args; do
  [ -z "$name" ] && continue
  timeout ${EXTRA_TIMEOUT:-90} python3 -m cupy_cosine_attn bench $args --no-progress --json "$OUT/$name.json" \
    --csv "$OUT/$name.csv" > "$OUT/$name.txt" 2>&1
  echo "bench $name exit $?"; tail -2 "$OUT/$name.txt"
done <<< "${EXTRA:-}"
exit 0
