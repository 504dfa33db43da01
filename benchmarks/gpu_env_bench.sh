#!/usr/bin/env bash
# The benchmark CLI once per environment line of ENVS ("NAME=value ..."; an empty line or "-" =
# the defaults), same arguments BENCH each time, so variants selected by the tuning knobs are
# measured through the package itself (its compile options and launch path) beside the peers.
# Logs and JSON to $OUT/env_bench_<k>.*; the table rows go to stdout.
#   OUT=dir BENCH="--dtype bf16 --d 128 --n 8192 --mode fwd" ENVS=$'-\nCUPY_COSINE_ATTN_SM90_WS=2' bash benchmarks/gpu_env_bench.sh
set -uo pipefail
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
k=0
while IFS= read -r envs; do
  k=$((k + 1))
  [ "$envs" = "-" ] && envs=""
  echo "== bench $k: ${envs:-defaults}"
  env $envs timeout ${BENCH_TIMEOUT:-120} python3 -m cupy_cosine_attn bench $BENCH --no-progress \
    --json "$OUT/env_bench_$k.json" > "$OUT/env_bench_$k.txt" 2>&1
  echo "exit $?"; grep -E "^\s*(fp16|bf16|float16|bfloat16)|cupy-cosine|sdpa|Error|error" "$OUT/env_bench_$k.txt" | head -${ROWS:-40}
done <<< "${ENVS:--}"
exit 0
