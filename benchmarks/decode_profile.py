"""One decode-attention launch per KV cache format, for a profiler (`ncu`) to look at.

    ncu --clock-control none --kernel-name regex:_decode_kernel --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section WarpStateStats python3 benchmarks/decode_profile.py int8

Dummy Llama-2-7B-shaped decode at batch 256, 2048 keys, one split: fp16 queries, 8 KV heads of 32 query heads.
"""

from __future__ import annotations

import sys

import torch

from martlet.bench.kernels import paged_cache
from martlet.kernels.decode import decode_attention

BATCH, CONTEXT = 256, 2048

for kv_cache_dtype in sys.argv[1:] or ["auto", "int8"]:
    kv, blocks = paged_cache(BATCH, CONTEXT, 8, 128, 16, torch.float16, kv_cache_dtype)
    q = torch.randn(BATCH, 32, 128, device="cuda", dtype=torch.float16)
    seq_lens = torch.full((BATCH,), CONTEXT, device="cuda", dtype=torch.int32)
    for _ in range(3):
        decode_attention(q, kv, seq_lens, blocks.view(BATCH, -1), 128**-0.5, 1)
    torch.cuda.synchronize()
