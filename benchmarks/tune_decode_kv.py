"""Decode tile configs per KV cache format: GB/s (bytes as stored) of each candidate on a few shapes.

    PYTHONPATH=$PWD [BLOCK_SIZE=16] python3 benchmarks/tune_decode_kv.py [FORMAT ...]   (default: auto int8 fp8)

The kernel's default config was tuned on bf16 (martlet/kernels/decode.py); an 8-bit tile is half the
bytes per key, so it may want more keys per tile or more warps. Queries are fp16, as in the seed rows'
model: the query dtype decides how 8-bit codes are widened (benchmarks/decode_ptx.py). The first runs,
in raw-2026-12-02-h200-kv/, used bf16 queries.

BLOCK_SIZE sets the cache's block size (tokens; default: the engine's for the format,
`config.default_block_size`). An 8-bit V tile is stored channel-major in its block, so a channel's
codes are one run of BLOCK_SIZE bytes: 16 gives pieces of 128-byte lines per load instruction, 128
whole lines (on an H200, int8 at batch 256 went from 70% to 90% of copy bandwidth).

The shapes are 32 query heads over 8 KV heads (grouped-query attention), and Llama-2-7B's own 32 over
32 at b32 x 1536 (the b32 1024/1024 row's mean context) and b256 x 320 (about the ShareGPT-like
workload's).
"""

from __future__ import annotations

import os
import sys

import torch

from martlet.bench.kernels import decode_case, geomean, paged_cache
from martlet.bench.roofline import measure_ceilings
from martlet.config import default_block_size
from martlet.kernels.decode import DecodeConfig

SHAPES = [(16, 32768, 8), (32, 2048, 8), (256, 2048, 8), (64, 512, 8), (32, 1536, 32), (256, 320, 32)]  # b, ctx, hkv
# With 4 stages or fewer, the pipeliner keeps one K/V tile in flight (decode_ptx.py prints the
# buffers: num_stages - 3, at least 1), which every candidate before session 3's look had; an 8-bit
# tile is half the bytes, so half the bytes in flight. Deeper pipelines come last.
CANDIDATES = [None] + [DecodeConfig(*c) for c in [
    (16, 2, 4), (64, 2, 4), (64, 4, 3), (64, 4, 4), (128, 4, 2), (128, 4, 3), (64, 8, 3), (128, 8, 3), (32, 4, 4),
    (32, 2, 5), (32, 2, 6), (32, 2, 8), (64, 2, 6), (64, 2, 8), (64, 4, 6), (128, 4, 5),
    # One warp: no barriers between warps for the softmax's row max and sum (3 a tile against 13 for four
    # warps over an 8-bit cache, sm_90 SASS), fewer instructions a key (int8: 32.1 and 28.8 against 34.4),
    # but 238-255 registers.
    (32, 1, 4), (64, 1, 3)]]


def main() -> None:
    copy = measure_ceilings(torch.device("cuda"), torch.bfloat16).copy_gb_s
    print(f"copy {copy:.0f} GB/s")
    formats = sys.argv[1:] or ["auto", "int8", "fp8"]
    totals: dict[str, list[float]] = {}
    for kv_cache_dtype in formats:
        block_size = int(os.environ.get("BLOCK_SIZE", default_block_size(kv_cache_dtype)))
        print(f"{kv_cache_dtype}: cache blocks of {block_size} tokens")
        pools = {8: paged_cache(256, 32768 if kv_cache_dtype == "auto" else 16384, 8, 128, block_size, torch.float16,
                                kv_cache_dtype),
                 32: paged_cache(256, 2048, 32, 128, block_size, torch.float16, kv_cache_dtype)}
        scores = {}
        for cfg in CANDIDATES:
            rows = [r for batch, ctx, hkv in SHAPES
                    for r in decode_case(batch, ctx, pools[hkv], configs=[cfg], dtype=torch.float16)]
            ok = [r for r in rows if "error" not in r]
            line = " ".join(f"b{r['batch']}/{r['context']}/{r['hkv']}:{r['GB/s']:5.0f}" for r in ok)
            if len(ok) == len(rows):
                scores[str(cfg)] = geomean([r["GB/s"] for r in ok])
                print(f"{kv_cache_dtype:4s} {cfg}: {line}  geomean {scores[str(cfg)]:.0f} GB/s", flush=True)
            else:
                print(f"{kv_cache_dtype:4s} {cfg}: error {rows[0].get('error', '')[:200]}", flush=True)
        print(f"-> {kv_cache_dtype}: best {max(scores, key=scores.get)}", flush=True)
        if kv_cache_dtype != "auto":
            for cfg, score in scores.items():
                totals.setdefault(cfg, []).append(score)
        del pools
        torch.cuda.empty_cache()
    # One tile serves both 8-bit formats (decode.EIGHT_BIT_CONFIG): the best over both, among tiles valid in both.
    both = {cfg: geomean(s) for cfg, s in totals.items() if len(s) == len([f for f in formats if f != "auto"])}
    if both:
        print(f"-> 8-bit formats together: best {max(both, key=both.get)} ({max(both.values()):.0f} GB/s)")


if __name__ == "__main__":
    main()
