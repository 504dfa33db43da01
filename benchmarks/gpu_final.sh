#!/usr/bin/env bash
# The GPU suite with GPU tests required, then compute-sanitizer memcheck and racecheck.
set -uo pipefail
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
TEST_TIMEOUT=${TEST_TIMEOUT:-300} TAIL=6 bash "$(dirname "$0")/gpu_check.sh" tests/test_gpu_forward.py tests/test_gpu_backward.py tests/test_gpu_torch.py tests/test_gpu_graphs.py tests/test_gpu_sm80_path.py tests/test_torch_ops.py
for tool in memcheck racecheck; do
  timeout ${SAN_TIMEOUT:-120} compute-sanitizer --tool $tool --error-exitcode 3 python3 benchmarks/sanitize_check.py > "$OUT/sanitizer_$tool.txt" 2>&1
  echo "compute-sanitizer $tool exit $?"; tail -3 "$OUT/sanitizer_$tool.txt"
done
