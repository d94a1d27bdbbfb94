#!/usr/bin/env bash
# Issue 22's GPU checks of speculative decoding, in two device commands on one machine (logs and JSON to $OUT).
#
# The SmolLM2 GGUF (98 MB) is more than one command may carry (64 MiB), so it travels in two parts, one
# per command, gathered in /tmp/specparts on the device (the machine must stay warm between the two);
# the gguf wheel (the GPU image has no gguf package) and SmolLM2's tokenizer (for the tiny test models)
# travel with the second and first. `bash benchmarks/prepare_carry.sh` prepares them on the CPU machine.
#
# PART=1 (carry build/spec/smollm2.gguf.part.00, build/spec/SHA256SUMS, build/spec/GGUF.sha256 and
# build/smollm2-tokenizer): the speculative tests on CUDA (graphs, Triton kernels; draft, Medusa, EAGLE),
# then on dummy Llama-2-7B fp16 the verification step's cost at b1, b8, b16 and b32 for k = 0..6 and a 2-layer
# draft model's speedup at the same batches for k = 0..6.
# Each step runs under a timeout, so that PART=1 fits in one ten-minute command.
# PART=2 (carry build/spec/smollm2.gguf.part.01 and the gguf wheel): n-gram on SmolLM2 at b1 on
# copy-heavy prompts, then the ShareGPT-like workload (dummy Llama-2-7B fp16) with n-gram speculation
# off and on (issue 22: on within 3% of off).
set -uo pipefail
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
HERE=$(cd "$(dirname "$0")" && pwd)
CFG=$HERE/models/llama-2-7b
P=/tmp/specparts; mkdir -p $P
cp -f build/spec/smollm2.gguf.part.* build/spec/*SHA* build/spec/*.sha256 $P/ 2>/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
case "${PART:-1}" in
1)
  mkdir -p ~/.cache/martlet && cp -r build/smollm2-tokenizer ~/.cache/martlet/
  echo "== speculative tests on CUDA"
  timeout 150 python3 -m pytest -q -rf tests/test_speculative_heads.py tests/test_speculative.py -k "cuda_graphs or triton_backend" \
    2>&1 | tee "$OUT/spec_tests.log" | tail -5
  echo "== verification cost (dummy 7B)"
  timeout 200 python3 benchmarks/spec_decode.py verify-cost --config-dir "$CFG" --json "$OUT/spec_verify_cost.json" 2>&1 \
    | tee "$OUT/spec_verify_cost.log"
  echo "== draft model (dummy 7B, 2-layer dummy draft)"
  timeout 200 python3 benchmarks/spec_decode.py draft --config-dir "$CFG" --draft-layers 2 --json "$OUT/spec_draft.json" 2>&1 \
    | tee "$OUT/spec_draft.log"
  ;;
2)
  if ! (cd $P && sha256sum -c --quiet SHA256SUMS); then
    echo "!! GGUF parts missing in $P: the machine was recycled since PART=1; run PART=1 again first"; exit 3
  fi
  cat $P/smollm2.gguf.part.* >/tmp/smollm2.gguf && (cd /tmp && sha256sum -c --quiet $P/GGUF.sha256) || exit 3
  env -u PYTHONPATH python3 -m pip install -q --no-index --no-deps --target /tmp/gguf-site build/spec/gguf-*.whl || exit 4
  export PYTHONPATH=$PWD:/tmp/gguf-site
  echo "== n-gram on SmolLM2, b1, copy-heavy prompts"
  python3 benchmarks/spec_decode.py ngram --model /tmp/smollm2.gguf --k 4 6 8 --json "$OUT/spec_ngram.json" 2>&1 \
    | tee "$OUT/spec_ngram.log"
  NGRAM='{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}'
  COMMON="--config-dir $CFG --load-format dummy --dtype float16 --max-model-len 2304 --quiet"
  for spec in off on; do
    echo "== throughput sharegpt-like, speculation $spec"
    extra=(); [ $spec = on ] && extra=(--speculative-config "$NGRAM")
    python3 -m martlet.cli bench throughput $COMMON --workload "$HERE/workloads/sharegpt_like_1024.jsonl" \
      --json "$OUT/spec_sharegpt_$spec.json" "${extra[@]}" 2>&1 | tail -10
  done
  ;;
esac
