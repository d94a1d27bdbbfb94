"""Three ways cuBLAS might do the model's matmuls better at 64-512 tokens, timed as the engine runs them.

    PYTHONPATH=$PWD python3 benchmarks/gemm_splitk.py [--tokens 64 128 ...] [--blas cublas|cublaslt] [--no-split]

- Split-K by hand: the K dimension cut into 2, 3 or 4 slices, one batched GEMM with fp32 partials,
  then a sum ("skN"); "skN-noreduce" is the batched GEMM alone, what a reduction fused into the next
  kernel would leave.
- `--blas cublaslt`: PyTorch's cuBLASLt path (`torch.backends.cuda.preferred_blas_library`).
- Swapped operands: W @ x^T, the same product as cuBLAS's other problem (m and n exchanged), for which
  its heuristics pick other kernels; "swap" leaves the result transposed, [N, M], "swap+T" adds the copy
  back to [M, N] that the engine's next kernel would need.

Each candidate is timed as in `gemm_graph.py`: one CUDA graph of one matmul per decoder layer, each
with its own weight, median replay. Printed per token count: us per layer shape and per decoder layer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from gemm_graph import floor_us, graph_us, layer_operands  # this script's directory is on sys.path
from gemm_sweep import layer_shapes

from martlet.bench.roofline import measure_ceilings


def split_k(x: torch.Tensor, w: torch.Tensor, splits: int, reduce: bool = True) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T as `splits` products over slices of K, summed in fp32."""
    m, k = x.shape
    n = w.shape[0]
    xs = x.view(m, splits, k // splits).transpose(0, 1)
    ws = w.view(n, splits, k // splits).permute(1, 2, 0)
    parts = torch.bmm(xs, ws, out_dtype=torch.float32)
    return parts.sum(0, dtype=x.dtype) if reduce else parts


def swapped(x: torch.Tensor, w: torch.Tensor, transpose_back: bool = True) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T computed as w @ x^T."""
    yt = torch.mm(w, x.t())
    return yt.t().contiguous() if transpose_back else yt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config-dir", default="benchmarks/models/llama-2-7b")
    ap.add_argument("--tokens", type=int, nargs="*", default=[64, 128, 192, 256, 320, 384, 512])
    ap.add_argument("--blas", choices=["cublas", "cublaslt"], default="cublas")
    ap.add_argument("--no-split", action="store_true", help="time the BLAS library's own matmul only")
    args = ap.parse_args()
    torch.backends.cuda.preferred_blas_library(args.blas)
    config = json.loads((Path(args.config_dir) / "config.json").read_text())
    layers = config["num_hidden_layers"]
    ceilings = measure_ceilings(torch.device("cuda"), torch.float16)
    print(f"{torch.cuda.get_device_name()}: copy {ceilings.copy_gb_s:.0f} GB/s, GEMM {ceilings.gemm_tflops:.0f} "
          f"TFLOP/s; {args.blas}", flush=True)
    for m in args.tokens:
        shapes, totals = [], {}
        for name, (n, k) in layer_shapes(config).items():
            xs, ws = layer_operands(m, n, k, layers)
            floor = floor_us(m, n, k, ceilings)
            us = {args.blas: graph_us(F.linear, xs, ws)}
            torch.testing.assert_close(swapped(xs[0], ws[0]), F.linear(xs[0], ws[0]), atol=2e-2, rtol=2e-2)
            us["swap"] = graph_us(lambda x, w: swapped(x, w, transpose_back=False), xs, ws)
            us["swap+T"] = graph_us(swapped, xs, ws)
            for s in () if args.no_split else (2, 3, 4):
                if k % (8 * s):
                    continue
                torch.testing.assert_close(split_k(xs[0], ws[0], s), F.linear(xs[0], ws[0]), atol=2e-2, rtol=2e-2)
                us[f"sk{s}"] = graph_us(lambda x, w, s=s: split_k(x, w, s), xs, ws)
                us[f"sk{s}-noreduce"] = graph_us(lambda x, w, s=s: split_k(x, w, s, reduce=False), xs, ws)
            for key, t in us.items():
                totals[key] = totals.get(key, 0.0) + t
            shapes.append(f"{name} floor {floor:.1f} " + " ".join(f"{key} {t:.1f}" for key, t in us.items()))
            del ws, xs
        print(f"M={m}: " + " | ".join(shapes), flush=True)
        print(f"M={m} per layer: " + ", ".join(f"{key} {t:.1f} us" for key, t in totals.items()), flush=True)


if __name__ == "__main__":
    main()
