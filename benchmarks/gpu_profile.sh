#!/usr/bin/env bash
# Hardware counters (ncu) for the kernels whose speed is in question: decode attention over a 16-bit and
# an int8 KV cache (decode_profile.py; DECODE_SHAPE="B CTX HKV", default the b32 1024/1024 row's), and the one-token qkv matmul in fp16, int8 and int4 weights
# (quant_linear_profile.py). One text report per kernel in $OUT (default ./bench-out-profile).
set -uo pipefail
OUT=${OUT:-bench-out-profile}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
HERE=$(cd "$(dirname "$0")" && pwd)
SECTIONS="--section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats
  --section SchedulerStats --section MemoryWorkloadAnalysis"
for kv in ${DECODE:-auto int8}; do
  echo "== decode, $kv cache"
  ncu --clock-control none --kernel-name regex:_decode_kernel --launch-skip 2 --launch-count 1 $SECTIONS \
    python3 "$HERE/decode_profile.py" "$kv" ${DECODE_SHAPE:-} > "$OUT/decode_$kv.txt" 2>&1; tail -3 "$OUT/decode_$kv.txt"
done
for fmt in ${LINEAR:-fp16 int8 int4}; do
  echo "== qkv matmul, $fmt weights, ${TOKENS:-1} token(s)"
  ncu --clock-control none --kernel-name regex:"_quant|_skinny" --launch-skip 2 --launch-count 1 $SECTIONS \
    python3 "$HERE/quant_linear_profile.py" "$fmt" "${TOKENS:-1}" > "$OUT/linear_$fmt.txt" 2>&1
  tail -3 "$OUT/linear_$fmt.txt"
done
