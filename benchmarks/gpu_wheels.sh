#!/usr/bin/env bash
# Download, on the CPU machine, the wheels the GPU image lacks (Python 3.12, x86_64) into the git-ignored
# .whl/, for `run`'s carry: gguf (GGUF models), xgrammar (structured output), the server's FastAPI,
# uvicorn and pydantic, and jsonschema (the structured-output tests), with what they need that the image
# does not have. The GPU scripts install whatever .whl/ holds (`pip install --no-deps .whl/*.whl`).
#
#   bash benchmarks/gpu_wheels.sh       # then carry ".whl" in the device command
set -euo pipefail
mkdir -p .whl
# The versions this machine's environment resolved together (pydantic pins its pydantic-core exactly).
PKGS=($(python3 -m pip list --format freeze 2>/dev/null | grep -i -E \
  "^(gguf|xgrammar|apache-tvm-ffi|fastapi|starlette|uvicorn|pydantic|pydantic[-_]core|annotated-types|typing-inspection|opentelemetry-api|jsonschema|jsonschema-specifications|referencing|rpds-py)==" ))
python3 -m pip download --quiet --no-deps --dest .whl --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any "${PKGS[@]}"
ls .whl
