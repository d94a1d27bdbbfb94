"""Decode attention over a ShareGPT-like batch of mixed context lengths: order, tile and split effects.

    PYTHONPATH=$PWD python3 benchmarks/decode_ragged.py [--batch 256] [--workload FILE]

A steady-state batch holds a request with probability proportional to its output length (long
answers stay longer), at a uniformly random point of its answer. Llama-2-7B geometry (32 KV heads,
head dim 128, fp16, 16-token pages). Printed: GB/s of K/V read, per sequence order, tile config and
split count.
"""

from __future__ import annotations

import argparse
import json
import random
from functools import partial

import torch
from triton.testing import do_bench

from martlet.bench.roofline import measure_ceilings
from martlet.kernels.decode import DecodeConfig, decode_attention
from martlet.layers.kv_cache import LayerKV


def steady_state_lengths(rows: list[dict], batch: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    picked = rng.choices(rows, weights=[r["output_len"] for r in rows], k=batch)
    return [r["input_len"] + rng.randint(1, r["output_len"]) for r in picked]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="*", default=[64, 160, 256])
    ap.add_argument("--workload", default="benchmarks/workloads/sharegpt_like_1024.jsonl")
    args = ap.parse_args()
    rows = [json.loads(line) for line in open(args.workload) if line.strip()]
    copy_gbs = measure_ceilings(torch.device("cuda"), torch.float16).copy_gb_s
    hkv, d, bs, dtype = 32, 128, 16, torch.float16
    configs = [None, DecodeConfig(16, 2, 4), DecodeConfig(32, 2, 2), DecodeConfig(32, 4, 3), DecodeConfig(64, 4, 2),
               DecodeConfig(16, 1, 3)]
    for batch in args.batch:
        lens = steady_state_lengths(rows, batch)
        pages = [-(-n // bs) for n in lens]
        kv = LayerKV(*(torch.randn(sum(pages), hkv, bs, d, device="cuda", dtype=dtype) for _ in range(2)))
        perm = torch.randperm(sum(pages), dtype=torch.int32).tolist()
        tables, at = [], 0
        for n in pages:
            tables.append(perm[at:at + n] + [0] * (max(pages) - n))
            at += n
        q = torch.randn(batch, hkv, d, device="cuda", dtype=dtype)
        nbytes = 2 * sum(lens) * hkv * d * 2
        print(f"batch {batch}: contexts mean {sum(lens) / batch:.0f}, max {max(lens)}, {nbytes / 1e9:.2f} GB of K/V")
        orders = {"as drawn": list(range(batch)),
                  "longest first": sorted(range(batch), key=lambda i: -lens[i]),
                  "shortest first": sorted(range(batch), key=lambda i: lens[i])}
        for name, order in orders.items():
            seq_lens = torch.tensor([lens[i] for i in order], device="cuda", dtype=torch.int32)
            bt = torch.tensor([tables[i] for i in order], device="cuda", dtype=torch.int32)
            for cfg in configs:
                for splits in (1, 2, 4):
                    call = partial(decode_attention, q, kv, seq_lens, bt, d**-0.5, splits, config=cfg)
                    ms = do_bench(call, rep=50)
                    print(f"  {name:14s} {cfg or 'default'} splits {splits}: {ms * 1e3:7.1f} us "
                          f"{nbytes / ms / 1e6:6.0f} GB/s ({nbytes / ms / 1e6 / copy_gbs:.0%} of copy)", flush=True)


if __name__ == "__main__":
    main()
