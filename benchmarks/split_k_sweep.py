"""The split-K matmul (martlet.kernels.split_k) against cuBLAS on the narrow weights, timed as the engine runs them.

    PYTHONPATH=$PWD python3 benchmarks/split_k_sweep.py [--tokens 64 128 ...] [--json FILE]

For o_proj and down_proj (4096 output features) at each token count: cuBLAS and every tile and split
count of a small grid that fits one program per SM, each in a CUDA graph of one matmul per decoder
layer (gemm_graph.py's harness). Printed: the floor, cuBLAS, the best three split-K configs (us).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from gemm_graph import graph_us  # this script's directory is on sys.path
from gemm_sweep import layer_shapes

from martlet.bench.roofline import measure_ceilings
from martlet.device import num_sms
from martlet.kernels.split_k import SplitKConfig, split_k_linear

TILES = [(64, 64), (64, 128), (128, 64), (128, 128)]
K_LOOPS = [(64, 4, 4), (64, 8, 3), (128, 4, 3)]  # (block_k, num_warps, num_stages)


def candidates(m: int, n: int, k: int, sms: int) -> list[SplitKConfig]:
    out = []
    for (bm, bn), (bk, warps, stages) in itertools.product(TILES, K_LOOPS):
        if bm > 64 and m <= 64:
            continue
        tiles = SplitKConfig(bm, bn, bk, 1).grid(m, n)
        most = min(sms // tiles, 8, k // bk)
        for split in sorted({most, max(most - 1, 1), max(most // 2, 1)} if most >= 1 else {1}):
            out.append(SplitKConfig(bm, bn, bk, split, warps, stages))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config-dir", default="benchmarks/models/llama-2-7b")
    ap.add_argument("--tokens", type=int, nargs="*", default=[64, 96, 128, 160, 192, 224, 256, 320, 384])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    config = json.loads((Path(args.config_dir) / "config.json").read_text())
    layers = config["num_hidden_layers"]
    device = torch.device("cuda")
    sms = num_sms(device)
    ceilings = measure_ceilings(device, torch.float16)
    print(f"{torch.cuda.get_device_name()}: copy {ceilings.copy_gb_s:.0f} GB/s, GEMM {ceilings.gemm_tflops:.0f} "
          f"TFLOP/s, {sms} SMs", flush=True)
    rows = []
    for name in ("o", "down"):
        n, k = layer_shapes(config)[name]
        ws = [torch.randn(n, k, device=device, dtype=torch.float16) / k**0.5 for _ in range(layers)]
        for m in args.tokens:
            xs = [torch.randn(m, k, device=device, dtype=torch.float16) for _ in range(layers)]
            floor = max(2 * n * k / ceilings.copy_gb_s / 1e3, 2 * m * n * k / ceilings.gemm_tflops / 1e6)
            cublas = graph_us(F.linear, xs, ws)
            timed = []
            for cfg in candidates(m, n, k, sms):
                try:
                    torch.testing.assert_close(split_k_linear(xs[0], ws[0], cfg), F.linear(xs[0], ws[0]),
                                               atol=2e-2, rtol=2e-2)
                    timed.append((graph_us(lambda x, w, cfg=cfg: split_k_linear(x, w, cfg), xs, ws), cfg))
                except Exception as e:  # a tile that does not fit shared memory
                    print(f"  {name} M={m} {cfg}: {type(e).__name__}: {str(e)[:80]}")
            timed.sort(key=lambda t: t[0])
            best = timed[0][0]
            print(f"{name:5s} M={m:4d} floor {floor:6.1f} us  cuBLAS {cublas:6.1f} ({100 * floor / cublas:3.0f}%)  "
                  f"split-K {best:6.1f} ({100 * floor / best:3.0f}%)  " +
                  "; ".join(f"{t:.1f} {c.block_m}x{c.block_n}x{c.block_k} s{c.split_k} w{c.num_warps} st{c.num_stages}"
                            for t, c in timed[:3]), flush=True)
            rows.append({"layer": name, "m": m, "floor_us": floor, "cublas_us": cublas,
                         "split_k": [{"us": t, **vars(c)} for t, c in timed]})
            del xs
        del ws
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
