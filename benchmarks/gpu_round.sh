#!/usr/bin/env bash
# One device call while tuning the Hopper kernels: the probe (every variant under test against a
# float64 truth and the sm80 kernels, then kernel-only speed beside SDPA flash/cuDNN), then the GPU
# suite with GPU tests required. If the probe finds a wrong variant, the suite runs with the
# environment FALLBACK_ENV ("NAME=value ..." selecting the previous variants), so the rest of the
# package is still checked. BENCH="cli args" then runs the benchmark CLI.
#   OUT=dir PROBE_ARGS="..." bash benchmarks/gpu_round.sh
set -uo pipefail
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
timeout ${PROBE_TIMEOUT:-240} python3 benchmarks/sm90_probe.py --out "$OUT" ${PROBE_ARGS:-} > "$OUT/probe.txt" 2>&1
echo "probe exit $?"; grep -E "FAIL|CORRECTNESS|Error|error" "$OUT/probe.txt" | head -20
grep -E "^  dtype=" "$OUT/probe.txt"
if ! grep -q "CORRECTNESS ALL OK" "$OUT/probe.txt"; then
  echo "probe not clean: suite with the previous kernel variants (${FALLBACK_ENV:-none})"
  [ -n "${FALLBACK_ENV:-}" ] && export ${FALLBACK_ENV}
fi
[ "${SUITE:-1}" = 1 ] && TEST_TIMEOUT=${TEST_TIMEOUT:-240} TAIL=8 bash "$(dirname "$0")/gpu_check.sh" ${SUITE_TESTS:-tests/test_gpu_forward.py tests/test_gpu_backward.py tests/test_gpu_torch.py tests/test_gpu_graphs.py tests/test_gpu_sm80_path.py tests/test_torch_ops.py}
if [ "${SAN:-0}" = 1 ]; then
  for tool in memcheck racecheck; do
    timeout ${SAN_TIMEOUT:-120} compute-sanitizer --tool $tool --error-exitcode 3 python3 benchmarks/sanitize_check.py > "$OUT/sanitizer_$tool.txt" 2>&1
    echo "compute-sanitizer $tool exit $?"; tail -2 "$OUT/sanitizer_$tool.txt"
  done
fi
if [ -n "${BENCH:-}" ]; then
  timeout ${BENCH_TIMEOUT:-120} python3 -m cupy_cosine_attn bench $BENCH --json "$OUT/bench.json" > "$OUT/bench.txt" 2>&1
  echo "bench exit $?"; grep -E "cupy-cosine|sdpa" "$OUT/bench.txt"
fi
exit 0
