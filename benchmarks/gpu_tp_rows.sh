#!/usr/bin/env bash
# Issue 21 on a machine with several GPUs (nvidia-h200-x2, -x4, -x8): the seed rows and the ShareGPT-like
# workload on dummy Llama-2-13B at TP=2 and Llama-2-70B at TP=8 (TP=4 on four GPUs), 7B b1 8/256 at
# TP=1 against TP=2, and the all-reduce at those models' decode sizes. Run from the repository root;
# logs and JSON go to $OUT. Each model's rows take several minutes: split them with MODELS, ROWS and
# SKIP_WORKLOAD to fit one command each.
#
#   bash benchmarks/gpu_tp_rows.sh                                 # PARTS="scaling 13b 70b allreduce"
#   PARTS=13b ROWS="1,8,256 256,8,256" SKIP_WORKLOAD=1 bash benchmarks/gpu_tp_rows.sh
#
# vLLM 0.26 on the same machine, back to back, with the same tensor-parallel size (.vx1 in the command
# before, then .vx2, as ../shared/peers/vllm/README.md says; the 13B shapes go in by --config-patch):
#   bash .vx2/install.sh && source .vx2/env.sh && python3 .vx2/vllm_peer.py .vx2/llama2-7b-dummy \
#     .vx2/sharegpt_like_1024.jsonl --config-patch "$(cat benchmarks/models/llama-2-13b/config.json)" \
#     --llm-kwargs '{"tensor_parallel_size": 2}' --json $OUT/vllm_13b_tp2.json
set -uo pipefail
OUT=${OUT:-bench-out-tp}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
HERE=$(cd "$(dirname "$0")" && pwd)
NGPU=$(nvidia-smi -L | wc -l)
PARTS=${PARTS:-scaling 13b 70b allreduce}
part() { [[ " $PARTS " == *" $1 "* ]]; }
echo "== $NGPU GPU(s)"
if [ "$NGPU" -lt 2 ]; then echo "!! tensor parallelism needs two GPUs or more"; exit 2; fi

rows() {  # name, config dir, tensor-parallel size, then gpu_seed_rows.sh's environment
  local name=$1 cfg=$2 tp=$3; shift 3
  echo "==== $name, TP=$tp"
  env "$@" OUT="$OUT/$name" CFG="$cfg" EXTRA="--tensor-parallel-size $tp" bash "$HERE/gpu_seed_rows.sh" 2>&1 \
    | tee "$OUT/$name.log" | grep -E "==|output throughput|roofline"
}

if part scaling; then  # gpt-fast reports 1.60x for 8B at TP=2; issue 21 asks 1.7x
  for tp in 1 2; do rows "7b_tp$tp" "$HERE/models/llama-2-7b" $tp ROWS=1,8,256 SKIP_WORKLOAD=1; done
fi
if part 13b; then
  rows 13b_tp2 "$HERE/models/llama-2-13b" 2 ROWS="${ROWS:-1,8,256 256,8,256 1,1024,1024 32,1024,1024}" \
    SKIP_WORKLOAD="${SKIP_WORKLOAD:-}"
fi
if part 70b && [ "$NGPU" -ge 4 ]; then
  TP70=$([ "$NGPU" -ge 8 ] && echo 8 || echo 4)
  rows "70b_tp$TP70" "$HERE/models/llama-2-70b" "$TP70" ROWS="${ROWS:-1,8,256 256,8,256 1,1024,1024 32,1024,1024}" \
    SKIP_WORKLOAD="${SKIP_WORKLOAD:-}"
fi
if part allreduce; then  # two all-reduces a layer: 13B's hidden 5120 (40 layers), 70B's 8192 (80 layers)
  for n in 2 4 8; do
    [ "$NGPU" -ge $n ] || break
    torchrun --nproc-per-node $n "$HERE/allreduce_symm_mem.py" --hidden 4096 5120 8192 --tokens 1 32 256 2>&1 \
      | tee "$OUT/allreduce_${n}gpu.log"
  done
fi
