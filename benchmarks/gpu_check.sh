#!/usr/bin/env bash
# One GPU session: environment, the GPU test suite with GPU tests required, then timings.
#   bash benchmarks/gpu_check.sh [pytest selection] ; logs under $OUT (or ./gpu_logs)
set -uo pipefail
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUPY_COSINE_ATTN_REQUIRE_GPU=1
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, cupy; print('torch', torch.__version__, 'cuda', torch.version.cuda); print('cupy', cupy.__version__, 'nvrtc', cupy.cuda.nvrtc.getVersion(), 'runtime', cupy.cuda.runtime.runtimeGetVersion())"
} 2>&1 | tee "$OUT/env.txt"
timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -m gpu -p no:cacheprovider ${PYTEST_ARGS:-} "${@:-tests}" 2>&1 | tee "$OUT/gpu_tests.txt" | tail -${TAIL:-30}
if [ -n "${BENCH_ARGS:-}" ]; then
  timeout ${BENCH_TIMEOUT:-240} python3 benchmarks/gpu_speed.py $BENCH_ARGS --json "$OUT/gpu_speed.json" 2>&1 | tee "$OUT/gpu_speed.txt"
fi
