"""A matmul for few tokens (decode at small batch): y = x @ W.T (+ bias), x [M, K] with small M.

At a handful of tokens a linear layer is a pass over its weight and nothing else: the product is
bound by how fast W streams from memory. cuBLAS splits such products over K and adds a reduce
kernel; here each program owns BLOCK_N output features and streams their full rows of W through
a pipelined loop, so one launch reads W once, with many programs' loads in flight at a time.

Reference: `torch.nn.functional.linear`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_TOKENS = 16  # one tile of rows: tl.dot's smallest M


@dataclass(frozen=True)
class SkinnyConfig:
    # Tuned on an H200 (`python -m martlet.bench.kernels --only skinny_linear --tune`).
    block_n: int = 32
    block_k: int = 256
    num_warps: int = 2
    num_stages: int = 4


@triton.jit
def _skinny_linear_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :],
                    other=0.0)
        if FP32:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def skinny_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, config: SkinnyConfig | None = None,
) -> torch.Tensor:
    """x [M, K], M <= MAX_TOKENS; weight [N, K], last dimensions contiguous -> [M, N]."""
    n, k = weight.shape
    m = x.shape[0]
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x {tuple(x.shape)} does not fit weight {tuple(weight.shape)}")
    if m > MAX_TOKENS:
        raise ValueError(f"skinny_linear takes at most {MAX_TOKENS} tokens, got {m}")
    if x.stride(1) != 1 or weight.stride(1) != 1 or x.dtype != weight.dtype:
        raise ValueError("x and weight need contiguous rows and one dtype")
    cfg = config or SkinnyConfig()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        _skinny_linear_kernel[(triton.cdiv(n, cfg.block_n),)](
            x, weight, bias, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
            HAS_BIAS=bias is not None, FP32=x.dtype == torch.float32,
            BLOCK_M=MAX_TOKENS, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, NUM_STAGES=cfg.num_stages,
            num_warps=cfg.num_warps,
        )
    return out
