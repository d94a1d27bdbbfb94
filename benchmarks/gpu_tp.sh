#!/usr/bin/env bash
# Tensor parallelism on the GPU machine. Run from the repository root; logs go to $OUT.
#  - always: the seed rows at TP=1 (gpu_seed_rows.sh), to compare with main's run of the same
#    script on the same kind of GPU (TP=1 must stay within 2%). With build/old/martlet (the engine
#    before tensor parallelism: `mkdir -p build/old && git archive b35fbd2 martlet | tar -x -C build/old`,
#    carried), the same rows with it first, back to back on this machine, alternating REPEAT times;
#  - with 2+ GPUs: the tensor-parallel tests on CUDA (NCCL inside CUDA graphs), the 7B latency rows
#    at TP=2, and the one-shot all-reduce (symmetric memory) against NCCL at decode sizes.
set -uo pipefail
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
HERE=$(cd "$(dirname "$0")" && pwd)
export PYTHONUNBUFFERED=1
NGPU=$(nvidia-smi -L | wc -l)
echo "== $NGPU GPU(s)"
# With build/old, old and new alternate REPEAT times (default 2): one b256 run varies by a few percent
# between calls, much less within one, so the pairs tell a 2% difference apart.
TP1_ROWS=${ROWS:-1,8,256 256,8,256 32,1024,1024}
for i in $(seq "${REPEAT:-2}"); do
  if [ -d build/old/martlet ]; then
    echo "== TP=1 seed rows, the engine before tensor parallelism (build/old), run $i"
    PYTHON="python3 -P" PYTHONPATH=$PWD/build/old OUT=$OUT/tp1_old_$i ROWS=$TP1_ROWS \
      SKIP_WORKLOAD=${SKIP_WORKLOAD:-} bash "$HERE/gpu_seed_rows.sh" 2>&1 | tee "$OUT/tp1_old_$i.log" | grep -E "==|tok/s|ms"
  elif [ "$i" -gt 1 ]; then
    break
  fi
  echo "== TP=1 seed rows, run $i"
  PYTHON="python3 -P" PYTHONPATH=$PWD OUT=$OUT/tp1_$i ROWS=$TP1_ROWS SKIP_WORKLOAD=${SKIP_WORKLOAD:-} \
    bash "$HERE/gpu_seed_rows.sh" 2>&1 | tee "$OUT/tp1_$i.log" | grep -E "==|tok/s|ms"
done
if [ "$NGPU" -lt 2 ]; then echo "== one GPU: no TP=2 runs"; exit 0; fi
echo "== TP tests on CUDA"
python3 -m pytest tests/test_tensor_parallel.py -k gpus -q -rf 2>&1 | tee "$OUT/tp_tests.log" | tail -5
echo "== TP=2 latency rows"
for row in 1,8,256 256,8,256; do
  IFS=, read -r B I O <<<"$row"
  python3 -m martlet.cli bench latency --config-dir "$HERE/models/llama-2-7b" --load-format dummy --dtype float16 \
    --max-model-len 2304 --quiet -tp 2 --batch-size "$B" --input-len "$I" --output-len "$O" --num-iters 2 \
    --json "$OUT/tp2_latency_b${B}_i${I}_o${O}.json" 2>&1 | tail -6
done
echo "== one-shot all-reduce vs NCCL"
torchrun --nproc-per-node 2 "$HERE/allreduce_symm_mem.py" 2>&1 | tee "$OUT/allreduce_2gpu.log"
if [ "$NGPU" -ge 4 ]; then torchrun --nproc-per-node 4 "$HERE/allreduce_symm_mem.py" 2>&1 | tee "$OUT/allreduce_4gpu.log"; fi
