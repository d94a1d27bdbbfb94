#!/usr/bin/env bash
# On the CPU machine, from the repository root: everything the GPU scripts carry that git does not hold,
# rebuilt from scratch (a new machine has none of it):
#   .whl/                     wheels the GPU image lacks (gpu_wheels.sh)
#   build/smollm2-tokenizer   SmolLM2's tokenizer, for the tiny test models and the 7B-shaped serving model
#   build/spec/               the SmolLM2 GGUF in two parts with checksums, and the gguf wheel (gpu_spec_decode.sh)
#   .vx1/ .vx2/               vLLM 0.26 in two parts (with VLLM=1; ../shared/peers/vllm/README.md; a few minutes)
#
#   bash benchmarks/prepare_carry.sh            # VLLM=1 W=<scratch dir> for the vLLM bundle too
set -euo pipefail
bash benchmarks/gpu_wheels.sh >/dev/null
python3 -c "from martlet.testing import load_test_tokenizer; load_test_tokenizer()"
mkdir -p build && rm -rf build/smollm2-tokenizer && cp -r ~/.cache/martlet/smollm2-tokenizer build/
G=$(python3 -c "from martlet.models.gguf import default_model_path as p; print(p())")
rm -rf build/spec && mkdir -p build/spec
split -n 2 -d "$G" build/spec/smollm2.gguf.part.
(cd build/spec && sha256sum -b smollm2.gguf.part.* >SHA256SUMS)
echo "$(sha256sum "$G" | cut -d' ' -f1)  smollm2.gguf" >build/spec/GGUF.sha256
cp .whl/gguf-*.whl build/spec/
if [ -n "${VLLM:-}" ]; then
  export W=${W:?set W to a scratch directory for the vLLM download}
  bash ../shared/peers/vllm/download.sh && bash ../shared/peers/vllm/build_bundle.sh
  bash ../shared/peers/vllm/prepare_repo.sh .
fi
du -sh .whl build/smollm2-tokenizer build/spec
