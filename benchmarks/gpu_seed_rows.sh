#!/usr/bin/env bash
# Seed-table 7B rows and the ShareGPT-like workload on one GPU, dummy Llama-2-7B fp16.
# Run on the GPU machine from the repository root; logs and JSON go to $OUT (default ./bench-out).
set -uo pipefail
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# shared/ does not travel to the GPU machine: benchmarks/ holds copies of its configs and workload
HERE=$(cd "$(dirname "$0")" && pwd)
CFG=${CFG:-$HERE/models/llama-2-7b}
# PYTHON="python3 -P" with PYTHONPATH=<another tree> runs that tree's engine: without -P, `python3 -m` puts
# the working directory (this tree's martlet/) ahead of PYTHONPATH.
M="${PYTHON:-python3} -m martlet.cli bench"
COMMON="--config-dir $CFG --load-format dummy --dtype float16 --max-model-len 2304 --quiet ${EXTRA:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
for row in ${ROWS:-1,8,256 256,8,256 1,1024,1024 32,1024,1024}; do
  IFS=, read -r B I O <<<"$row"
  echo "== latency b$B in$I out$O"
  $M latency $COMMON --batch-size "$B" --input-len "$I" --output-len "$O" --num-iters ${ITERS:-2} \
     --json "$OUT/latency_b${B}_i${I}_o${O}.json" 2>&1 | tail -8
done
if [ -z "${SKIP_WORKLOAD:-}" ]; then
  echo "== throughput sharegpt-like"
  $M throughput $COMMON --workload "$HERE/workloads/sharegpt_like_1024.jsonl" --json "$OUT/throughput_sharegpt.json" 2>&1 | tail -9
fi
