#!/usr/bin/env bash
# Weight-only quantization on one GPU, dummy Llama-2-7B: first the quantization tests on this GPU
# (kernels compiled, not interpreted), then the kernel micro-benchmark (packed formats against fp16
# at 1..256 tokens, GB/s in each format's own bytes), then the seed rows and the ShareGPT-like
# workload (gpu_seed_rows.sh) for fp16, --quantization int8 and int4, and 7B-shaped Q4_0 and Q4_K
# GGUF files written from random blocks (write_dummy_gguf.py; kept packed, the CUDA default).
# Run on the GPU machine from the repository root; logs and JSON go to $OUT (default ./bench-out-quant).
#
#   bash benchmarks/gpu_quant_rows.sh
#   STEPS="tests kernels" bash benchmarks/gpu_quant_rows.sh          # a part only (default: all four)
#   FORMATS="int4" GGUF_TYPES="q4_k" ROWS="1,8,256" SKIP_WORKLOAD=1 bash benchmarks/gpu_quant_rows.sh
#   SWEEP=1 STEPS=kernels bash benchmarks/gpu_quant_rows.sh         # also sweep the kernel's tiles (SWEEP_TOKENS="4 16")
#
# Each step fits in ten minutes alone on an H200 but all four do not: split with STEPS, FORMATS, ROWS.
set -uo pipefail
# Wheels the GPU image lacks (gguf, xgrammar, the server's), carried in the git-ignored .whl/ (`run`'s carry;
# `bash benchmarks/gpu_wheels.sh` downloads them).
[ -d .whl ] && python3 -m pip install --no-deps --quiet .whl/*.whl
OUT=${OUT:-bench-out-quant}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
HERE=$(cd "$(dirname "$0")" && pwd)
STEPS=${STEPS:-tests kernels rows gguf}
step() { [[ " $STEPS " == *" $1 "* ]]; }

if step tests; then
  echo "== quantization tests on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
  python3 -m pytest -q tests/kernels/test_quant_linear.py tests/test_quant_gguf.py tests/test_quant_quality.py \
    -k "not default_model and not agreement_with_unquantized" 2>&1 | tail -5 | tee "$OUT/tests.txt"
fi
if step kernels; then
  echo "== kernel micro-benchmark"
  python3 "$HERE/quant_linear_bench.py" --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.txt"
  if [ -n "${SWEEP:-}" ]; then
    # About 0.4 s a tile: two token counts for two formats fit in ten minutes, not more.
    python3 "$HERE/quant_linear_bench.py" --tokens ${SWEEP_TOKENS:-4 16} --formats int4 int8 --sweep --json "$OUT/sweep.json" \
      2>&1 | tee "$OUT/sweep.txt"
  fi
fi
if step rows; then
  for q in ${FORMATS:-fp16 int8 int4}; do
    echo "==== $q"
    flag=""; [ "$q" != fp16 ] && flag="--quantization $q"
    OUT="$OUT/$q" EXTRA="$flag ${EXTRA:-}" bash "$HERE/gpu_seed_rows.sh"
  done
fi
if step gguf; then
  for t in ${GGUF_TYPES:-q4_0 q4_k}; do
    file=${GGUF_DIR:-/tmp}/llama-2-7b-$t.gguf
    [ -f "$file" ] || python3 "$HERE/write_dummy_gguf.py" --config-dir "$HERE/models/llama-2-7b" --type "$t" "$file"
    echo "==== gguf $t"
    OUT="$OUT/gguf-$t" CFG="$file" EXTRA="--load-format auto ${EXTRA:-}" bash "$HERE/gpu_seed_rows.sh"
  done
fi
