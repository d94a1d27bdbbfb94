"""A matmul for a few hundred tokens on a narrow weight: y = x @ W.T with K split across programs.

At 128-256 tokens, a weight of 4096 output features (o_proj and down_proj of a 7B model) has too
few 128 x 128 output tiles to fill a GPU: 64 at 256 tokens for 132 SMs on an H100, where cuBLAS
reaches 44-55% of the floor (benchmarks/results/seed-rows-H100-2026-11-21.md). Here each tile's K
range is cut into SPLIT_K slices, one program each. The programs of slices 1.. write fp32 partial
tiles to a workspace and count themselves in a per-tile counter; the program of slice 0 waits for
the count, adds the partials to its own accumulator, writes the output and resets the counter for
the next launch. The reduction costs no extra kernel.

A waiting program holds its SM, so every program must be resident at once: the grid is at most one
program per SM, and slice-0 programs come last in launch order anyway. (The interpreter runs programs
one after the other in launch order, so on the CPU any grid is safe.)

Reference: `torch.nn.functional.linear`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from martlet.device import num_sms
from martlet.kernels.linear import _dot


@dataclass(frozen=True)
class SplitKConfig:
    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    split_k: int = 2
    num_warps: int = 4
    num_stages: int = 4

    def grid(self, m: int, n: int) -> int:
        return triton.cdiv(m, self.block_m) * triton.cdiv(n, self.block_n) * self.split_k


@triton.jit
def _split_k_linear_kernel(
    x_ptr, w_ptr, out_ptr, partials_ptr, counters_ptr, M, N, K, stride_xm, stride_wn, stride_om,
    SPLIT_K: tl.constexpr, FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_tiles = num_m * tl.cdiv(N, BLOCK_N)
    tile = pid % num_tiles
    split = SPLIT_K - 1 - pid // num_tiles  # slice 0, the one that waits, is launched last
    # Row tiles vary fastest: the programs that share a weight tile run side by side and hit it in L2.
    offs_m = (tile % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (tile // num_m) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = split * k_per_split
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(k_start, tl.minimum(K, k_start + k_per_split), BLOCK_K, num_stages=NUM_STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :],
                    other=0.0)
        acc += _dot(x, w, FP32)
    in_tile = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    if split > 0:
        tl.store(partials_ptr + ((split - 1) * num_tiles + tile) * BLOCK_M * BLOCK_N + in_tile, acc)
        tl.debug_barrier()  # all of this program's partial is written before the count says so
        tl.atomic_add(counters_ptr + tile, 1, sem="release")
    else:
        if SPLIT_K > 1:
            while tl.atomic_add(counters_ptr + tile, 0, sem="acquire") < SPLIT_K - 1:
                pass
            for s in tl.static_range(SPLIT_K - 1):
                acc += tl.load(partials_ptr + (s * num_tiles + tile) * BLOCK_M * BLOCK_N + in_tile,
                               cache_modifier=".cg")
            tl.atomic_xchg(counters_ptr + tile, 0)
        out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


MAX_TILES = 1024  # output tiles of one launch: counters kept per device


@functools.cache
def _counters(device: torch.device) -> torch.Tensor:
    """One counter per output tile, zero between launches."""
    return torch.zeros(MAX_TILES, dtype=torch.int32, device=device)


def split_k_linear(x: torch.Tensor, weight: torch.Tensor, config: SplitKConfig) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T -> [M, N]; rows contiguous, one dtype, no more programs than SMs."""
    n, k = weight.shape
    m = x.shape[0]
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x {tuple(x.shape)} does not fit weight {tuple(weight.shape)}")
    if x.stride(1) != 1 or weight.stride(1) != 1 or x.dtype != weight.dtype:
        raise ValueError("x and weight need contiguous rows and one dtype")
    grid = config.grid(m, n)
    if x.is_cuda and config.split_k > 1 and grid > num_sms(x.device):
        raise ValueError(f"{grid} programs for {num_sms(x.device)} SMs: the waiting ones could starve the rest")
    tiles = grid // config.split_k
    if tiles > MAX_TILES:
        raise ValueError(f"{tiles} output tiles, more than the {MAX_TILES} counters")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    partials = torch.empty((config.split_k - 1) * tiles * config.block_m * config.block_n, dtype=torch.float32,
                           device=x.device)
    if m:
        _split_k_linear_kernel[(grid,)](
            x, weight, out, partials, _counters(x.device), m, n, k, x.stride(0), weight.stride(0), out.stride(0),
            SPLIT_K=config.split_k, FP32=x.dtype == torch.float32, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            BLOCK_K=config.block_k, NUM_STAGES=config.num_stages, num_warps=config.num_warps,
        )
    return out
