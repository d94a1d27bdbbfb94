#!/usr/bin/env bash
# Serving benchmark on one GPU: `martlet serve` with dummy Llama-2-7B fp16, driven by `martlet bench serve`
# on the ShareGPT-like workload at three request rates, then the offline `bench throughput` of the same
# workload for comparison. Run from the repository root on the GPU machine; results go to $OUT.
set -uo pipefail
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
CFG=${CFG:-benchmarks/models/llama-2-7b}
WL=benchmarks/workloads/sharegpt_like_1024.jsonl
ENGINE="--load-format dummy --dtype ${DTYPE:-float16} --max-model-len 2304"
python3 -m martlet.cli serve --model $CFG $ENGINE --port 8000 --disable-access-log >"$OUT/server.log" 2>&1 &
SERVER=$!
python3 - <<'PY'
import time, urllib.request
for _ in range(240):
    try:
        urllib.request.urlopen("http://127.0.0.1:8000/health", timeout=1); break
    except Exception:
        time.sleep(1)
PY
for spec in ${RATES:-4:256 16:512 inf:1024}; do  # request rate (1/s):number of requests
  IFS=: read -r RATE N <<<"$spec"
  echo "== serve: request rate $RATE/s, $N requests"
  python3 -m martlet.cli bench serve --base-url http://127.0.0.1:8000 --workload $WL --num-prompts "$N" \
    --request-rate "$RATE" --vocab-size 32000 --json "$OUT/serve_rate_$RATE.json" 2>&1 | grep -v "it/s\]" | tail -22
done
kill -TERM $SERVER; wait $SERVER; echo "server exit code $?"
echo "== offline throughput, same workload"
python3 -m martlet.cli bench throughput --config-dir $CFG $ENGINE --workload $WL ${NUM_OFFLINE:+--num-prompts $NUM_OFFLINE} --quiet --json "$OUT/offline_throughput.json" 2>&1 | tail -9
