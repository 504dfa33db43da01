#!/usr/bin/env bash
# A kernel change against the commit before it, in one device call: the benchmark CLI run from a
# baseline tree and from this one, alternating (ROUNDS times), with the same arguments BENCH.
# BASE: a directory holding the baseline's package and kernels, made with
#   git archive <commit> cupy_cosine_attn kernels | tar -x -C BASE
# Logs and JSON to $OUT/ab_<base|new>_<round>.*; the table rows go to stdout.
#   OUT=dir BASE=_ab_base BENCH="--dtype bf16 --d 128 --n 16384 --mode bwd" bash benchmarks/gpu_ab_trees.sh
set -uo pipefail
OUT=$(mkdir -p "${OUT:-gpu_logs}" && cd "${OUT:-gpu_logs}" && pwd)
HERE=$(pwd)
for r in $(seq "${ROUNDS:-2}"); do
  for side in base new; do
    dir=$HERE; [ "$side" = base ] && dir=$BASE
    (cd "$dir" && env ${ENVS:-} timeout "${BENCH_TIMEOUT:-300}" python3 -m cupy_cosine_attn bench $BENCH \
       --no-progress --json "$OUT/ab_${side}_$r.json") > "$OUT/ab_${side}_$r.txt" 2>&1
    echo "== $side round $r exit $?"
    grep -E "^\s*(fp16|bf16|float16|bfloat16)|Error|error" "$OUT/ab_${side}_$r.txt" | head -"${ROWS:-60}"
  done
done
exit 0
