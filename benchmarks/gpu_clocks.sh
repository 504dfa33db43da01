#!/usr/bin/env bash
# Run a command while sampling the GPU's SM clock, power draw and temperature every SAMPLE_MS
# (default 100) into $OUT/$NAME.clocks.csv, the command's output into $OUT/$NAME.txt: whether a
# long benchmark cell runs at a lower clock than a short one (power or thermal limits).
#   OUT=dir NAME=probe bash benchmarks/gpu_clocks.sh python3 -m cupy_cosine_attn bench ...
set -uo pipefail
OUT=${OUT:-gpu_logs}; NAME=${NAME:-clocks}; mkdir -p "$OUT"
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu \
  --format=csv,noheader -lms ${SAMPLE_MS:-100} > "$OUT/$NAME.clocks.csv" 2>&1 &
smi=$!
"$@" > "$OUT/$NAME.txt" 2>&1
rc=$?
kill $smi 2>/dev/null; wait $smi 2>/dev/null
echo "exit $rc"; exit $rc
