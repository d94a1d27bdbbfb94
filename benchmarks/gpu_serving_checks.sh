#!/usr/bin/env bash
# The serving checks of issue 23 on one GPU, through `martlet serve` with dummy Llama-2-7B fp16:
#   json    json_schema-constrained against unconstrained throughput, 64 requests in flight
#   n       n=4 against the same prompts as 4 separate requests (prompt sharing), at saturation
#   latency TTFT and ITL p99 at 4 requests/s, plain and with a quarter json_schema and a quarter n=2
#   soak    benchmarks/soak.py at saturation (SOAK_SECONDS, default 600), its report in $OUT/soak.json
#   soak-start, then soak-wait: the same soak over two device commands, since ten minutes and the server's
#           start do not fit in one. soak-start runs it in a session of its own (setsid: the device keeps
#           such a process while the machine is held) and returns; soak-wait, the next command on the same
#           machine within its idle time, waits up to SOAK_WAIT seconds (default 560) for the report.
#   offline json_schema against unconstrained in the engine alone (benchmarks/structured_offline.py), with a
#           profile of ten steps of each
# Run from the repository root: PARTS="json n latency" (about 6 minutes with the start), then PARTS=soak with
# SOAK_SECONDS under the per-command limit (the server takes a minute or two to start). Results go to $OUT.
#
# Structured output needs a tokenizer, and the 7B config dir has none: the model here is
# Llama-2-7B's shapes with SmolLM2's tokenizer (vocabulary 49,152 instead of 32,000: 1.4% more
# weights, the same for every run compared). The tokenizer is made on a CPU machine with
# `python -c "from martlet.testing import load_test_tokenizer; load_test_tokenizer()"` and carried in
# build/smollm2-tokenizer (see gpu_checks.sh).
set -uo pipefail
# Wheels the GPU image lacks (gguf, xgrammar, the server's), carried in the git-ignored .whl/ (`run`'s carry;
# `bash benchmarks/gpu_wheels.sh` downloads them).
[ -d .whl ] && python3 -m pip install --no-deps --quiet .whl/*.whl
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PARTS=${PARTS:-json n latency soak}
MODEL=build/llama-2-7b-smollm2-vocab
mkdir -p "$MODEL" && cp build/smollm2-tokenizer/* "$MODEL"/
python3 - "$MODEL" <<'PY'
import json, sys
from pathlib import Path
from transformers import AutoTokenizer
config = json.loads(Path("benchmarks/models/llama-2-7b/config.json").read_text())
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], local_files_only=True)
config.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
Path(sys.argv[1], "config.json").write_text(json.dumps(config, indent=1))
PY
ENGINE="--load-format dummy --dtype ${DTYPE:-float16} --max-model-len 2304"
WL=benchmarks/workloads/sharegpt_like_1024.jsonl
BENCH="python3 -m martlet.cli bench serve --base-url http://127.0.0.1:8000 --workload $WL --vocab-size 49152"

bench() {  # name, then bench serve options
  local name=$1; shift
  echo "== $name: $*"
  $BENCH --json "$OUT/$name.json" "$@" 2>&1 | grep -v "it/s\]" | grep -E "Successful|Failed|Output token|TTFT p99|ITL p99|error"
}

if [[ " $PARTS " =~ " offline " ]]; then
  echo "== offline: structured output in the engine alone"
  PYTHONPATH=$PWD python3 benchmarks/structured_offline.py --model $MODEL --json "$OUT/structured_offline.json" \
    --trace "$OUT/structured_offline_trace" 2>&1 | tee "$OUT/structured_offline.log" | grep -E "tok/s|=="
fi
if [[ " $PARTS " =~ " json " || " $PARTS " =~ " n " || " $PARTS " =~ " latency " ]]; then
  python3 -m martlet.cli serve --model $MODEL $ENGINE --port 8000 --disable-access-log >"$OUT/server.log" 2>&1 &
  SERVER=$!
  python3 - $SERVER "$OUT/server.log" <<'PY' || exit 1
import os, sys, time, urllib.request
for _ in range(900):
    try:
        urllib.request.urlopen("http://127.0.0.1:8000/health", timeout=1); break
    except Exception:
        if not os.path.exists(f"/proc/{sys.argv[1]}"):
            sys.exit("the server exited:\n" + open(sys.argv[2]).read()[-2000:])
        time.sleep(1)
PY
  if [[ " $PARTS " =~ " json " ]]; then
    bench json_unconstrained --num-prompts 384 --max-concurrency 64
    bench json_constrained --num-prompts 384 --max-concurrency 64 --json-schema-fraction 1
  fi
  if [[ " $PARTS " =~ " n " ]]; then
    bench n4_one_request --num-prompts 256 --n 4
    bench n4_separate --num-prompts 256 --copies 4
  fi
  if [[ " $PARTS " =~ " latency " ]]; then
    bench latency_plain --num-prompts 192 --request-rate 4
    bench latency_mixed --num-prompts 192 --request-rate 4 --json-schema-fraction 0.25 --n 2 --n-fraction 0.25
  fi
  kill -TERM $SERVER; wait $SERVER; echo "server exit code $?"
  python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def get(name):
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None
pairs = [("json_constrained", "json_unconstrained", "json_schema / unconstrained output tok/s (>= 0.90)"),
         ("n4_one_request", "n4_separate", "n=4 / 4 separate requests, output tok/s (>= 1.5)")]
for a, b, title in pairs:
    if get(a) and get(b):
        print(f"{title}: {get(a)['output_throughput'] / get(b)['output_throughput']:.3f}")
for name in ("latency_plain", "latency_mixed"):
    if get(name):
        r = get(name)
        print(f"{name}: TTFT p99 {r['ttft_ms']['p99']:.1f} ms (<= 60), ITL p99 {r['itl_ms']['p99']:.1f} ms (<= 20), "
              f"failed {r['failed']}")
PY
fi

SOAK_DIR=/tmp/martlet-soak
soak() {  # the soak's report to $1, then its output
  python3 benchmarks/soak.py --duration "${SOAK_SECONDS:-600}" --concurrency 64 --sample-every 30 --json "$1" \
    -- --model $MODEL $ENGINE
}
if [[ " $PARTS " =~ " soak-start " ]]; then
  mkdir -p $SOAK_DIR && rm -f $SOAK_DIR/soak.json
  echo "== soak started: ${SOAK_SECONDS:-600} s at 64 clients, log in $SOAK_DIR/soak.log"
  export -f soak; export MODEL ENGINE SOAK_SECONDS
  setsid bash -c "soak $SOAK_DIR/soak.json" >$SOAK_DIR/soak.log 2>&1 < /dev/null &
fi
if [[ " $PARTS " =~ " soak-wait " ]]; then
  for _ in $(seq "${SOAK_WAIT:-560}"); do [ -f $SOAK_DIR/soak.json ] && break; sleep 1; done
  cp $SOAK_DIR/soak.json $SOAK_DIR/soak.log "$OUT"/ 2>/dev/null
  tail -40 $SOAK_DIR/soak.log
fi
if [[ " $PARTS " =~ " soak " ]]; then
  echo "== soak: ${SOAK_SECONDS:-600} s at 64 clients"
  soak "$OUT/soak.json" 2>&1 | tail -40
fi
