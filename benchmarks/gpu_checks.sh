#!/usr/bin/env bash
# Every GPU-only test on the device machine: kernels (bf16 included) and the engine on CUDA.
# The tiny test models need SmolLM2's tokenizer, which is made from the GGUF on a CPU machine
# (`python -c "from martlet.testing import load_test_tokenizer; load_test_tokenizer()"`) and carried
# over in build/smollm2-tokenizer, since the GPU machine has neither the gguf package nor the GGUF.
set -uo pipefail
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
mkdir -p ~/.cache/martlet && cp -r build/smollm2-tokenizer ~/.cache/martlet/
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m pytest tests/kernels tests/test_gpu_engine.py -q -rf 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
