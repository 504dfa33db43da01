#!/usr/bin/env bash
# Kernel changes against the commits before them, in one device call: the benchmark CLI run from
# baseline trees and from this one, alternating (ROUNDS times), with the same arguments BENCH.
# TREES: "label=dir ..." of the baselines, each dir holding a commit's package and kernels, made with
#   git archive <commit> cupy_cosine_attn kernels | tar -x -C DIR
# this tree runs last in each round as "new". Logs and JSON to $OUT/ab_<label>_<round>.*; the
# table rows go to stdout.
#   OUT=dir TREES="v8=_ab/v8" BENCH="--dtype bf16 --d 128 --n 16384 --mode bwd" bash benchmarks/gpu_ab_trees.sh
set -uo pipefail
OUT=$(mkdir -p "${OUT:-gpu_logs}" && cd "${OUT:-gpu_logs}" && pwd)
HERE=$(pwd)
for r in $(seq "${ROUNDS:-2}"); do
  for side in ${TREES:-} new=.; do
    label=${side%%=*}; dir=${side#*=}
    (cd "$HERE" && cd "$dir" && env ${ENVS:-} timeout "${BENCH_TIMEOUT:-300}" python3 -m cupy_cosine_attn bench $BENCH \
       --no-progress --json "$OUT/ab_${label}_$r.json") > "$OUT/ab_${label}_$r.txt" 2>&1
    echo "== $label round $r exit $?"
    grep -E "^\s*(fp16|bf16|float16|bfloat16)|Error|error" "$OUT/ab_${label}_$r.txt" | grep -v "^#" | head -"${ROWS:-60}"
  done
done
exit 0
