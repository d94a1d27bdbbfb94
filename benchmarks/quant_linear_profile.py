"""One packed-weight matmul launch per format, for a profiler (`ncu`) to look at, as decode_profile.py
does for decode attention:

    ncu --clock-control none --kernel-name regex:"_quant|_skinny" --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section WarpStateStats python3 benchmarks/quant_linear_profile.py int4

Llama-2-7B's qkv projection (N 12288, K 4096) at one token: fp16 runs the engine's skinny kernel, int8
and int4 the packed kernel at the tile `quant_linear_config` picks.
"""

from __future__ import annotations

import sys

import torch

from martlet.kernels.linear import skinny_linear
from martlet.kernels.quant_linear import quant_linear
from martlet.layers.quantization import packed
from martlet.layers.quantization.packed import PackedFormat

N, K, TOKENS = 12288, 4096, int(sys.argv[2]) if len(sys.argv) > 2 else 1
FORMATS = {"int8": PackedFormat(8, K, False), "int4": PackedFormat(4, 128, True)}

name = sys.argv[1] if len(sys.argv) > 1 else "int4"
x = torch.randn(TOKENS, K, device="cuda", dtype=torch.float16)
weight = torch.randn(N, K, device="cuda") / K**0.5
if name == "fp16":
    w16 = weight.half()
    matmul = lambda: skinny_linear(x, w16)  # noqa: E731
else:
    tensors = packed.quantize(weight, FORMATS[name], torch.float16)
    matmul = lambda: quant_linear(x, *tensors, FORMATS[name])  # noqa: E731
for _ in range(3):
    matmul()
torch.cuda.synchronize()
