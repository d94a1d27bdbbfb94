#!/usr/bin/env bash
# The quantized KV cache on one GPU (issue P5), dummy Llama-2-7B fp16. Run from the repository root.
#   PART=tests: the GPU tests of the kernels and the engine, then `bench kernels` decode over bf16,
#               int8 and fp8 caches.
#   PART=rows:  b32 1024/1024 and the ShareGPT-like workload with an fp16, an int8 and an fp8 cache
#               (KV_DTYPES picks some; EXTRA adds engine flags to every run, e.g. "--block-size 128").
#   PART=profile: where a step's time goes per cache format, without PDL (profile_steps.py; CASES, default
#               b32mid: the b32 row at its mean context; "sharegpt" the workload at full batch), then the
#               decode tiles per format (tune_decode_kv.py; TUNE_TIMEOUT=0 skips them).
# Logs and JSON go to $OUT, packed into one results.tgz (the device returns at most 8 files).
set -uo pipefail
OUT=${OUT:-bench-out}; WORK=$(mktemp -d); mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$WORK/gpu.txt"
(cat COMMIT 2>/dev/null || git rev-parse HEAD) > "$WORK/commit.txt"
if [ "${PART:-tests}" = tests ]; then
  timeout ${TEST_TIMEOUT:-330} python3 -m pytest ${TESTS:-tests/kernels/test_rotary_kv.py tests/kernels/test_decode.py \
    tests/kernels/test_prefill.py tests/kernels/test_backend.py tests/test_gpu_engine.py} -q -rf 2>&1 \
    | tee "$WORK/gpu_tests.log" | tail -15
  timeout 200 python3 -m martlet.cli bench kernels --only decode --quick --json "$WORK/kernels_decode.json" 2>&1 \
    | tee "$WORK/kernels_decode.log" | tail -32
elif [ "$PART" = profile ]; then
  for kv in ${KV_DTYPES:-auto int8 fp8}; do
    echo "=== kv_cache_dtype $kv"
    timeout 150 python3 benchmarks/profile_steps.py --case ${CASES:-b32mid} --kv-cache-dtype "$kv" --no-pdl 2>&1 \
      | tee "$WORK/profile_$kv.log" | grep -E "^=====|^wall|decode attention|^ +_[a-z_]+kernel "
  done
  [ "${TUNE_TIMEOUT:-240}" != 0 ] && timeout ${TUNE_TIMEOUT:-240} python3 benchmarks/tune_decode_kv.py \
    ${KV_DTYPES:-auto int8 fp8} 2>&1 | tee "$WORK/tune.log" | grep -E "^->|copy|None"
else
  for kv in ${KV_DTYPES:-auto int8 fp8}; do
    echo "=== kv_cache_dtype $kv"
    OUT=$WORK/$kv EXTRA="--kv-cache-dtype $kv ${EXTRA:-}" ROWS="${ROWS:-32,1024,1024}" ITERS=${ITERS:-2} bash benchmarks/gpu_seed_rows.sh 2>&1 \
      | tee "$WORK/rows_$kv.log" | grep -E "^==|output throughput|roofline|KV cache|Error|error"
  done
fi
tar czf "$OUT/results.tgz" -C "$WORK" .
