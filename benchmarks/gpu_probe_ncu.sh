#!/usr/bin/env bash
# One device call while tuning: several probe runs (each line of PROBES is one set of
# sm90_probe.py arguments, logged to $OUT/probe_<k>.txt), then Nsight Compute on chosen kernels
# of one forward+backward step (NCU: lines "name|kernel regex|env|step args"), each with the warp
# stall sampling per SASS instruction exported as CSV ($OUT/ncu_<name>_source.csv). SUITE=1 then
# runs the GPU suite with GPU tests required, under the environment SUITE_ENV ("NAME=value ...",
# e.g. a tuning knob that selects a variant not yet the default).
#   OUT=dir PROBES=$'args one\nargs two' NCU=$'bwd|attn_bwd_wgmma||--d 128 --n 8192' bash benchmarks/gpu_probe_ncu.sh
set -uo pipefail
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
k=0
while IFS= read -r args; do
  [ -z "$args" ] && continue
  k=$((k + 1))
  timeout ${PROBE_TIMEOUT:-200} python3 benchmarks/sm90_probe.py --out "$OUT" $args > "$OUT/probe_$k.txt" 2>&1
  echo "probe $k ($args) exit $?"; grep -E "FAIL|CORRECTNESS|Error|error|precompiled" "$OUT/probe_$k.txt" | head -8
  grep -E "^  dtype=" "$OUT/probe_$k.txt"
done <<< "${PROBES:-}"
while IFS='|' read -r name regex envs stepargs; do
  [ -z "$name" ] && continue
  env $envs timeout ${NCU_TIMEOUT:-150} ncu --clock-control none --kernel-name "regex:$regex" \
    --launch-skip 1 --launch-count 1 --section SpeedOfLight --section WarpStateStats \
    --section SourceCounters --section ComputeWorkloadAnalysis --section Occupancy \
    --import-source no -f -o "$OUT/ncu_$name" python3 benchmarks/profile_step.py $stepargs \
    > "$OUT/ncu_${name}_run.txt" 2>&1
  echo "ncu $name exit $?"; tail -2 "$OUT/ncu_${name}_run.txt"
  ncu -i "$OUT/ncu_$name.ncu-rep" --page details > "$OUT/ncu_$name.txt" 2>&1
  ncu -i "$OUT/ncu_$name.ncu-rep" --page source --csv --print-source sass > "$OUT/ncu_${name}_source.csv" 2>&1
  echo "  source csv lines: $(wc -l < "$OUT/ncu_${name}_source.csv")"; head -c 600 "$OUT/ncu_${name}_source.csv"; echo
done <<< "${NCU:-}"
if [ "${SUITE:-0}" = 1 ]; then
  echo "suite with: ${SUITE_ENV:-defaults}"
  env ${SUITE_ENV:-} TEST_TIMEOUT=${TEST_TIMEOUT:-240} TAIL=6 bash "$(dirname "$0")/gpu_check.sh" \
    tests/test_gpu_forward.py tests/test_gpu_backward.py tests/test_gpu_torch.py tests/test_gpu_graphs.py \
    tests/test_gpu_sm80_path.py tests/test_torch_ops.py
fi
exit 0
