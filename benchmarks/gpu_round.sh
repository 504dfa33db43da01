#!/usr/bin/env bash
# One device call while tuning the Hopper kernels: the probe (every variant under test against a
# float64 truth and the sm80 kernels, then kernel-only speed beside SDPA flash/cuDNN), then the GPU
# suite with GPU tests required. If the probe finds a wrong variant, the suite runs with the
# serial backward and the smem-Q forward, so the rest of the package is still checked.
#   OUT=dir PROBE_ARGS="..." bash benchmarks/gpu_round.sh
set -uo pipefail
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
timeout ${PROBE_TIMEOUT:-240} python3 benchmarks/sm90_probe.py --out "$OUT" ${PROBE_ARGS:-} > "$OUT/probe.txt" 2>&1
echo "probe exit $?"; grep -E "FAIL|CORRECTNESS|Error|error" "$OUT/probe.txt" | head -20
grep -E "^  dtype=" "$OUT/probe.txt"
if ! grep -q "CORRECTNESS ALL OK" "$OUT/probe.txt"; then
  echo "probe not clean: suite with the serial backward and smem-Q forward"
  export CUPY_COSINE_ATTN_SM90_BWD_PIPE=0 CUPY_COSINE_ATTN_SM90_QREG=0
fi
[ "${SUITE:-1}" = 1 ] && TEST_TIMEOUT=${TEST_TIMEOUT:-240} TAIL=8 bash "$(dirname "$0")/gpu_check.sh" ${SUITE_TESTS:-tests/test_gpu_forward.py tests/test_gpu_backward.py tests/test_gpu_torch.py tests/test_gpu_graphs.py tests/test_gpu_sm80_path.py tests/test_torch_ops.py}
exit 0
