"""How close the model's matmuls come to their floor at every token count, cuBLAS against Triton tiles.

    python3 benchmarks/gemm_sweep.py [--config-dir DIR] [--tokens 32 64 ...] [--json FILE]

For each Llama linear layer (qkv, o, gate_up, down) and token count M, the floor is
max(weight bytes / copy bandwidth, FLOPs / GEMM rate), both ceilings measured at start. Printed:
cuBLAS (F.linear) and the best of a few Triton tile configs, each as time and % of the floor.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.testing import do_bench

from martlet.bench.roofline import measure_ceilings

TOKENS = [32, 64, 128, 192, 256, 384, 512, 1024, 2048]
# (block_m, block_n, block_k, num_warps, num_stages)
CONFIGS = [
    (64, 64, 128, 4, 4), (64, 128, 64, 4, 4), (64, 128, 128, 4, 3), (64, 256, 64, 8, 3),
    (128, 64, 64, 4, 4), (128, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
]


@triton.jit
def _matmul_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr):
    # Row tiles vary fastest: the programs that share a weight tile run side by side and hit it in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m, pid_n = pid % num_m, pid // num_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        mask_k = k0 + offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :],
                    mask=(offs_m < M)[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + (k0 + offs_k)[None, :],
                    mask=(offs_n < N)[:, None] & mask_k[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w))
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@triton.jit
def _matmul_tma_kernel(x_desc, w_desc, out_desc, M, N, K,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       NUM_STAGES: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    off_m, off_n = (pid % num_m) * BLOCK_M, (pid // num_m) * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        acc += tl.dot(x_desc.load([off_m, k0]), w_desc.load([off_n, k0]).T)
    out_desc.store([off_m, off_n], acc.to(out_desc.dtype))


def triton_linear(x: torch.Tensor, w: torch.Tensor, cfg: tuple, tma: bool) -> torch.Tensor:
    bm, bn, bk, warps, stages = cfg
    m, k = x.shape
    n = w.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        _matmul_tma_kernel[grid](
            TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(w, [bn, bk]),
            TensorDescriptor.from_tensor(out, [bm, bn]), m, n, k,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, NUM_STAGES=stages, num_warps=warps)
    else:
        _matmul_kernel[grid](x, w, out, m, n, k, x.stride(0), w.stride(0), out.stride(0),
                             BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, NUM_STAGES=stages, num_warps=warps)
    return out


def layer_shapes(config: dict) -> dict[str, tuple[int, int]]:
    h, i = config["hidden_size"], config["intermediate_size"]
    hd = config.get("head_dim", h // config["num_attention_heads"])
    qkv = (config["num_attention_heads"] + 2 * config.get("num_key_value_heads", config["num_attention_heads"])) * hd
    return {"qkv": (qkv, h), "o": (h, config["num_attention_heads"] * hd), "gate_up": (2 * i, h), "down": (h, i)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config-dir", default="benchmarks/models/llama-2-7b")
    ap.add_argument("--tokens", type=int, nargs="*", default=TOKENS)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    config = json.loads((Path(args.config_dir) / "config.json").read_text())
    device = torch.device("cuda")
    ceilings = measure_ceilings(device, torch.float16)
    copy_bw, gemm_rate = ceilings.copy_gb_s * 1e9, ceilings.gemm_tflops * 1e12
    print(f"{ceilings.device}: copy {copy_bw / 1e9:.0f} GB/s, fp16 GEMM {gemm_rate / 1e12:.0f} TFLOP/s")
    rows = []
    for name, (n, k) in layer_shapes(config).items():
        w = torch.randn(n, k, device=device, dtype=torch.float16) / k**0.5
        for m in args.tokens:
            x = torch.randn(m, k, device=device, dtype=torch.float16)
            floor = max(2 * n * k / copy_bw, 2 * m * n * k / gemm_rate) * 1e3
            ref = F.linear(x, w)
            row = {"layer": name, "m": m, "n": n, "k": k, "floor_ms": floor,
                   "cublas_ms": do_bench(partial(F.linear, x, w), rep=30)}
            for tma in (False, True):
                for cfg in CONFIGS:
                    try:
                        got = triton_linear(x, w, cfg, tma)
                    except Exception as e:  # a config that does not fit shared memory
                        print(f"  {name} M={m} {cfg} tma={tma}: {type(e).__name__}")
                        continue
                    torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)
                    ms = do_bench(partial(triton_linear, x, w, cfg, tma), rep=30)
                    row[f"{'tma' if tma else 'ptr'}{cfg}"] = ms
            best = min((v, key) for key, v in row.items() if key.startswith(("tma", "ptr")))
            row["best_ms"], row["best"] = best
            print(f"{name:8s} M={m:5d} floor {floor:.4f} ms  cuBLAS {row['cublas_ms']:.4f} "
                  f"({100 * floor / row['cublas_ms']:.0f}%)  best Triton {best[0]:.4f} ({100 * floor / best[0]:.0f}%) "
                  f"{best[1]}", flush=True)
            rows.append(row)
    print("\nper layer (4 matmuls), by token count:")
    print("| M | floor ms | cuBLAS ms | % | best Triton ms | % | best single config ms |")
    print("|---|---|---|---|---|---|---|")
    for m in args.tokens:
        sel = [r for r in rows if r["m"] == m]
        keys = [key for key in sel[0] if key.startswith(("tma", "ptr")) and all(key in r for r in sel)]
        single = min(((sum(r[key] for r in sel), key) for key in keys), default=(float("nan"), ""))
        f, c, b = (sum(r[key] for r in sel) for key in ("floor_ms", "cublas_ms", "best_ms"))
        print(f"| {m} | {f:.3f} | {c:.3f} | {100 * f / c:.0f}% | {b:.3f} | {100 * f / b:.0f}% | "
              f"{single[0]:.3f} {single[1]} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
