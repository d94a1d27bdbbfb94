"""Decode-attention launches per KV cache format, for a profiler (`ncu`) to look at.

    ncu --clock-control none --kernel-name regex:_decode_kernel --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section WarpStateStats python3 benchmarks/decode_profile.py int8 [B CTX HKV]

Dummy Llama-2-7B-shaped decode, fp16 queries over 32 query heads, with the split count and cache block
size the engine would use. Default shape: the b32 1024/1024 row at its mean context (32 sequences of
1536 keys, Llama-2-7B's 32 KV heads); `256 2048 8` is the grouped-query shape of the first profiles.
"""

from __future__ import annotations

import sys

import torch

from martlet.bench.kernels import block_tables_for, paged_cache
from martlet.config import default_block_size
from martlet.kernels.decode import decode_attention, decode_num_splits

kv_cache_dtype = sys.argv[1] if len(sys.argv) > 1 else "int8"
batch, context, kv_heads = (int(x) for x in sys.argv[2:5]) if len(sys.argv) > 4 else (32, 1536, 32)
block_size = default_block_size(kv_cache_dtype)
kv, blocks = paged_cache(batch, context, kv_heads, 128, block_size, torch.float16, kv_cache_dtype)
q = torch.randn(batch, 32, 128, device="cuda", dtype=torch.float16)
seq_lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
splits = decode_num_splits(batch, kv_heads, context, q.device)
print(f"{kv_cache_dtype}: b{batch} x {context} keys, {kv_heads} KV heads, blocks of {block_size}, {splits} split(s)")
for _ in range(4):
    decode_attention(q, kv, seq_lens, block_tables_for(blocks, batch, context, block_size), 128**-0.5, splits)
torch.cuda.synchronize()
