#!/usr/bin/env bash
# W8A8 (fp8, w8a8) on one GPU, dummy Llama-2-7B. Steps:
#   tests  the W8A8 tests and the kernels they use, compiled on this GPU (skinny 8-bit weights, fused
#          norm / SiLU*mul quantization, _scaled_mm / _int_mm against the CPU reference, graphs = eager)
#   bench  benchmarks/w8a8_bench.py: skinny (W8A16) against quantize_rows + tensor cores at 1..64 tokens
#          on the 7B projections (places w8a8.SKINNY_MAX_TOKENS), the skinny tile for 8-bit weights,
#          fused against unfused activation quantization
#   rows   gpu_seed_rows.sh for fp16, fp8 and w8a8: b1 8/256, b256 8/256 and b1 2048/1 (its TTFT is the
#          prefill row), back to back in this one lease
# Run on the GPU machine from the repository root; logs and JSON go to $OUT (default ./bench-out-w8a8).
#
#   STEPS="tests bench" bash benchmarks/gpu_w8a8.sh      # not yet timed: meant for well under 10 min
#   STEPS=rows bash benchmarks/gpu_w8a8.sh               # nine model loads: likewise
#   FORMATS="fp16 fp8" ROWS="1,8,256" STEPS=rows bash benchmarks/gpu_w8a8.sh
set -uo pipefail
# Wheels the GPU image lacks (gguf, xgrammar, the server's), carried in the git-ignored .whl/ (`run`'s carry;
# `bash benchmarks/gpu_wheels.sh` downloads them).
[ -d .whl ] && python3 -m pip install --no-deps --quiet .whl/*.whl
OUT=${OUT:-bench-out-w8a8}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
HERE=$(cd "$(dirname "$0")" && pwd)
STEPS=${STEPS:-tests bench rows}
step() { [[ " $STEPS " == *" $1 "* ]]; }
git rev-parse --short HEAD 2>/dev/null | tee "$OUT/commit.txt"

if step tests; then
  echo "== W8A8 tests on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
  python3 -m pytest -q -rf tests/test_w8a8.py tests/kernels/test_linear.py tests/kernels/test_quantize.py \
    tests/kernels/test_norm.py tests/kernels/test_activation.py 2>&1 | tail -15 | tee "$OUT/tests.txt"
fi
if step bench; then
  echo "== skinny against tensor cores, fused quantization"
  python3 "$HERE/w8a8_bench.py" --json "$OUT/w8a8_bench.json" 2>&1 | tee "$OUT/w8a8_bench.txt"
fi
if step rows; then
  for q in ${FORMATS:-fp16 fp8 w8a8}; do
    echo "==== $q"
    flag=""; [ "$q" != fp16 ] && flag="--quantization $q"
    OUT="$OUT/$q" ROWS="${ROWS:-1,8,256 256,8,256 1,2048,1}" SKIP_WORKLOAD=1 EXTRA="$flag ${EXTRA:-}" \
      bash "$HERE/gpu_seed_rows.sh"
  done
fi
