"""A matmul for few tokens (decode at small batch): y = x @ W.T (+ bias), x [M, K] with small M.

At a handful of tokens a linear layer is a pass over its weight and nothing else: the product is
bound by how fast W streams from memory. cuBLAS splits such products over K and adds a reduce
kernel; here each program owns BLOCK_N output features and streams their full rows of W through
a pipelined loop, so one launch reads W once, with many programs' loads in flight at a time.

The tile depends on the weight's width (`skinny_config`): a narrow weight has about one program
per SM, each streaming long rows through a deep pipeline; a wide one has several per SM.

The weight may also be 8-bit codes (int8 or fp8 e4m3, W8A8's layout) with one fp32 scale per output
feature: the codes are widened to x's dtype in registers and the scales applied to the accumulators,
so a few tokens read one byte a weight and need no activation quantization (W8A16).

Reference: `torch.nn.functional.linear` (by codes * scales[:, None] for 8-bit codes).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from martlet.device import num_sms
from martlet.kernels.pdl import pdl_launch, wait_for_previous_kernel
from martlet.kernels.quantize import widen

CODE_DTYPES = (torch.int8, torch.float8_e4m3fn)  # 8-bit weights, with a scale per output feature
MAX_TOKENS = 32  # rows padded to a tile of 16 or 32; more go to cuBLAS (this kernel is tuned up to 32)
# The SiLU-gated variant pays off with the 16-row tile only: b1 decode +1.5%, b32 -2.7% (H200,
# benchmarks/results/skinny-linear-H200-2026-11-21.md).
SILU_AND_MUL_MAX_TOKENS = 16


@dataclass(frozen=True)
class SkinnyConfig:
    block_n: int = 32
    block_k: int = 256
    num_warps: int = 2
    num_stages: int = 5
    # K cut into this many slices, each its own program, and their fp32 sums added by a second kernel:
    # more programs for a narrow weight (N 4096 fills only 128 programs of 32 rows).
    split_k: int = 1


def skinny_config(
    n: int, dtype: torch.dtype, device: torch.device, weight_dtype: torch.dtype | None = None
) -> SkinnyConfig:
    """The tile for an [N, K] weight: the best per Llama-2-7B projection, timed inside a CUDA graph
    at 16 and 32 tokens on an H200 (benchmarks/gemm_graph.py; benchmarks/results/skinny-linear-H200-2026-11-21.md).
    fp32 takes half the K tile, so a pipeline stage holds the same bytes and fits in shared memory.
    8-bit weights (fp8 timed at 1 and 16 tokens, one run: benchmarks/results/w8a8-H200-2026-12-02.md)
    keep o's, down's and gate_up's fp16 K tile, qkv doubles it, and all take one stage more than fp16
    where it fits: 4-17% faster than the fp16 tile with K doubled. o and down (fp8, 2026-12-03) split K in
    two: at 1 and 16 tokens, o 9.3 -> 7.8 us and 11.5 -> 8.3 us, down 20.0 -> 14.6 us and 25.7 -> 15.2 us.
    """
    columns_of_32 = triton.cdiv(n, 32)
    eight_bit = weight_dtype in CODE_DTYPES
    if columns_of_32 <= 2 * num_sms(device):  # o, down (N 4096): one program per SM
        cfg = SkinnyConfig(32, 256, 2, 5, split_k=2 if eight_bit else 1)
    elif columns_of_32 <= 4 * num_sms(device):  # qkv (N 12288)
        cfg = SkinnyConfig(32, 256, 2, 5) if eight_bit else SkinnyConfig(32, 128, 2, 4)
    else:
        cfg = SkinnyConfig(64, 128, 4, 4 if eight_bit else 3)  # gate_up (N 22016), LM head
    if dtype.itemsize > 2:
        cfg = replace(cfg, block_k=cfg.block_k // 2)
    return cfg


@triton.jit
def _dot(x, w, FP32: tl.constexpr):
    if FP32:
        return tl.dot(x, tl.trans(w), input_precision="ieee")
    return tl.dot(x, tl.trans(w))


@triton.jit
def _epilogue(acc, acc_up, scale_ptr, bias_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n, N, stride_om,
              HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, SILU_AND_MUL: tl.constexpr):
    """Per-channel weight scales (the up rows' N on, when gated), bias, SiLU(gate) * up; store the
    [BLOCK_M, BLOCK_N] tile."""
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if SILU_AND_MUL:
            acc_up *= tl.load(scale_ptr + N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if SILU_AND_MUL:
        acc = acc * tl.sigmoid(acc) * acc_up
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _skinny_linear_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, partial_ptr, M, N, K, stride_xm, stride_wn, stride_om,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, SILU_AND_MUL: tl.constexpr, FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
    SPLIT_K: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start, k_end = split_k_range(K, BLOCK_K, SPLIT_K)
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=NUM_STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)
        w_mask = mask_n[:, None] & mask_k[None, :]
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=w_mask, other=0.0)
        acc += _dot(x, widen(w, x.dtype), FP32)  # 8-bit codes widen exactly
        if SILU_AND_MUL:  # W is [gate; up]: the up row of output column n is row N + n
            w_up = tl.load(w_ptr + (N + offs_n)[:, None] * stride_wn + offs_k[None, :], mask=w_mask, other=0.0)
            acc_up += _dot(x, widen(w_up, x.dtype), FP32)
    if SPLIT_K == 1:
        _epilogue(acc, acc_up, scale_ptr, bias_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n, N, stride_om,
                  HAS_SCALE, HAS_BIAS, SILU_AND_MUL)
    else:
        store_partial_sums(partial_ptr, acc, acc_up, offs_m, offs_n, mask_n, N, SILU_AND_MUL)


@triton.jit
def split_k_range(K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """This program's slice of K (program axis 1 is the slice): whole BLOCK_K steps, the last slice
    ending at K. Unsplit, the bounds are plainly 0 and K: computed ones compiled to 3-10% more
    instructions (sm_90)."""
    k_start, k_end = 0, K
    if SPLIT_K > 1:
        k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        k_start = tl.program_id(1) * k_per_split
        k_end = tl.minimum(K, k_start + k_per_split)
    return k_start, k_end


@triton.jit
def store_partial_sums(partial_ptr, acc, acc_up, offs_m, offs_n, mask_n, N, SILU_AND_MUL: tl.constexpr):
    """A K slice's raw sums [BLOCK_M, BLOCK_N] to partial [SPLIT_K, 2 (gate or plain, up), BLOCK_M, N]
    (`partial_sums`), for `reduce_partial_sums` to add up and finish."""
    BLOCK_M: tl.constexpr = acc.shape[0]
    tile = partial_ptr + tl.program_id(1) * 2 * BLOCK_M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(tile, acc, mask=mask_n[None, :])
    if SILU_AND_MUL:
        tl.store(tile + BLOCK_M * N, acc_up, mask=mask_n[None, :])


@triton.jit
def _skinny_reduce_kernel(
    partial_ptr, scale_ptr, bias_ptr, out_ptr, M, N, stride_om,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, SILU_AND_MUL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, PDL: tl.constexpr,
):
    """The split-K slices' sums added, then the epilogue the single-slice kernel applies itself."""
    wait_for_previous_kernel(PDL)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    tile = partial_ptr + offs_m[:, None] * N + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for split in tl.static_range(SPLIT_K):
        acc += tl.load(tile + split * 2 * BLOCK_M * N, mask=mask_n[None, :], other=0.0)
        if SILU_AND_MUL:
            acc_up += tl.load(tile + (split * 2 + 1) * BLOCK_M * N, mask=mask_n[None, :], other=0.0)
    _epilogue(acc, acc_up, scale_ptr, bias_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n, N, stride_om,
              HAS_SCALE, HAS_BIAS, SILU_AND_MUL)


def skinny_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, config: SkinnyConfig | None = None,
    silu_and_mul: bool = False, weight_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K], M <= MAX_TOKENS; weight [N, K], last dimensions contiguous -> [M, N].

    weight is in x's dtype, or 8-bit codes (`CODE_DTYPES`) with `weight_scale`, fp32 [N]: the weight is
    codes * weight_scale[:, None].

    With `silu_and_mul`, weight is a gated MLP's merged [gate; up] and the result SiLU(x gate^T) * (x up^T),
    [M, N / 2]: the activation is applied to the accumulators, so the [M, N] product never goes to memory.
    """
    n, k = weight.shape
    m = x.shape[0]
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x {tuple(x.shape)} does not fit weight {tuple(weight.shape)}")
    if m > MAX_TOKENS:
        raise ValueError(f"skinny_linear takes at most {MAX_TOKENS} tokens, got {m}")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("x and weight need contiguous rows")
    codes = weight.dtype in CODE_DTYPES
    if codes != (weight_scale is not None) or (not codes and x.dtype != weight.dtype):
        raise ValueError("weight needs x's dtype, or 8-bit codes with a weight_scale")
    if codes and (weight_scale.shape != (n,) or weight_scale.dtype != torch.float32
                                     or weight_scale.stride(0) != 1):
        raise ValueError(f"weight_scale must be contiguous fp32 [{n}]")
    if silu_and_mul and (n % 2 or bias is not None):
        raise ValueError("silu_and_mul needs a [gate; up] weight of even height and no bias")
    cfg = config or skinny_config(n, x.dtype, x.device, weight.dtype)
    # Gated, a program reads block_n / 2 gate rows and as many up rows: as many weight bytes as ungated.
    out_n, block_n = (n // 2, cfg.block_n // 2) if silu_and_mul else (n, cfg.block_n)
    out = torch.empty(m, out_n, dtype=x.dtype, device=x.device)
    if m:
        block_m = 16 if m <= 16 else 32
        partial = partial_sums(cfg.split_k, block_m, out) if cfg.split_k > 1 else None
        _skinny_linear_kernel[(triton.cdiv(out_n, block_n), cfg.split_k)](
            x, weight, weight_scale, bias, out, partial, m, out_n, k, x.stride(0), weight.stride(0), out.stride(0),
            HAS_SCALE=codes, HAS_BIAS=bias is not None, SILU_AND_MUL=silu_and_mul, FP32=x.dtype == torch.float32,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=cfg.block_k, NUM_STAGES=cfg.num_stages, SPLIT_K=cfg.split_k,
            num_warps=cfg.num_warps, **pdl_launch(x.device),
        )
        if partial is not None:
            reduce_partial_sums(partial, weight_scale, bias, out, has_scale=codes, silu_and_mul=silu_and_mul)
    return out


def partial_sums(split_k: int, block_m: int, out: torch.Tensor) -> torch.Tensor:
    """The fp32 scratch a split-K launch writes its slices' sums to (`store_partial_sums`), for `out`
    [M, N]: [split_k, 2 (gate or plain, up), block_m, N]."""
    return torch.empty(split_k, 2, block_m, out.shape[1], dtype=torch.float32, device=out.device)


def reduce_partial_sums(partial: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None,
                        out: torch.Tensor, has_scale: bool, silu_and_mul: bool) -> None:
    """Add up a split-K launch's slices (`partial_sums`) into `out`, with the epilogue a single slice
    applies itself: per-channel `scale` (if `has_scale`), bias, SiLU(gate) * up."""
    split_k, _, block_m, n = partial.shape
    _skinny_reduce_kernel[(triton.cdiv(n, 128),)](
        partial, scale, bias, out, out.shape[0], n, out.stride(0), HAS_SCALE=has_scale, HAS_BIAS=bias is not None,
        SILU_AND_MUL=silu_and_mul, BLOCK_M=block_m, BLOCK_N=128, SPLIT_K=split_k, num_warps=4,
        **pdl_launch(out.device))
