"""Matmuls by weights in the packed layout (`martlet.layers.quantization.packed`): y = x @ W.T.

A decode step at small batch is a pass over the weights, so 4-bit weights should make it up to 4x
faster than fp16 ones, if nothing but the packed words cross the memory bus. `quant_linear` streams
them once: each program owns BLOCK_N output rows and walks their contiguous words along K, unpacks
the codes in registers and scales them there, and feeds tensor cores. Code j of every word of a
tile multiplies inputs j, j + pack, j + 2 pack, ... of x, so the unpacked weight never needs
reshaping: the tile is `pack` dot products with x's columns gathered at stride `pack` (x is small
and stays in cache). Groups hold a multiple of `pack` inputs, so all codes of a word share their
scale, which is loaded once per word.

Up to MAX_TOKENS rows take one row tile; up to MAX_GEMM_TOKENS the same kernel tiles M too (a GEMM
that dequantizes inside); beyond, `dequantize` writes the fp16 weight to a scratch tensor for
cuBLAS, whose cost is then spread over enough tokens to vanish. All of it is CUDA-graph safe: no
host syncs, and the scratch tensor is allocated the same way at every call.

Reference: `martlet.layers.quantization.packed.dequantize` followed by `torch.nn.functional.linear`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from martlet.kernels.linear import _dot
from martlet.kernels.pdl import pdl_launch, wait_for_previous_kernel
from martlet.layers.quantization.packed import PackedFormat

MAX_TOKENS = 32  # one row tile of 16 or 32
# Untuned first guesses (no GPU at hand when written): benchmarks/gpu_quant_rows.sh measures them.
MAX_GEMM_TOKENS = 256  # tiled over M in the kernel up to here; dequantize + cuBLAS beyond
SILU_AND_MUL_MAX_TOKENS = 16


@dataclass(frozen=True)
class QuantLinearConfig:
    block_m: int
    block_n: int
    block_k: int  # inputs per step, a multiple of 16 * pack
    num_warps: int
    num_stages: int


def quant_linear_config(m: int, fmt: PackedFormat) -> QuantLinearConfig:
    """The tile for m tokens. A step reads 256 contiguous bytes of each of its rows (128 when M is
    tiled too), which leaves every code position at least 16 inputs, tl.dot's minimum."""
    row_bytes_k = 8 // fmt.bits  # inputs per byte of a row
    if m <= 16:
        return QuantLinearConfig(16, 32, 256 * row_bytes_k, 4, 3)
    if m <= MAX_TOKENS:
        return QuantLinearConfig(32, 32, 256 * row_bytes_k, 4, 3)
    return QuantLinearConfig(64, 64, 128 * row_bytes_k, 4, 3)


@triton.jit
def _dequantize_codes(words, j, scale, offset, BITS: tl.constexpr, ASYMMETRIC: tl.constexpr,
                      SCALE_IN_LOOP: tl.constexpr, DTYPE: tl.constexpr):
    """Code j of each word as a weight in DTYPE (unscaled when the scale waits for the epilogue)."""
    codes = (words >> (j * BITS)) & ((1 << BITS) - 1)
    if ASYMMETRIC:
        return codes.to(DTYPE) * scale + offset
    centered = (codes - (1 << (BITS - 1))).to(DTYPE)
    if SCALE_IN_LOOP:
        return centered * scale
    return centered


@triton.jit
def _dequant_dot(
    acc, x_ptr, w_ptr, s_ptr, o_ptr, offs_m, mask_m, rows, mask_rows, word_cols, mask_words,
    stride_xm, stride_wn, stride_sn,
    BITS: tl.constexpr, GROUP: tl.constexpr, ASYMMETRIC: tl.constexpr, SCALE_IN_LOOP: tl.constexpr,
    FP32: tl.constexpr,
):
    """acc += x[:, the tile's inputs] @ W[rows, the tile's inputs]^T, W dequantized in registers."""
    PACK: tl.constexpr = 32 // BITS
    dtype = x_ptr.dtype.element_ty
    w_mask = mask_rows[:, None] & mask_words[None, :]
    words = tl.load(w_ptr + rows[:, None] * stride_wn + word_cols[None, :], mask=w_mask, other=0)
    scale = None
    offset = None
    if SCALE_IN_LOOP:
        s_offs = rows[:, None] * stride_sn + (word_cols * PACK // GROUP)[None, :]
        scale = tl.load(s_ptr + s_offs, mask=w_mask, other=0.0)
        if ASYMMETRIC:
            offset = tl.load(o_ptr + s_offs, mask=w_mask, other=0.0)
    x_mask = mask_m[:, None] & mask_words[None, :]
    for j in tl.static_range(PACK):
        w = _dequantize_codes(words, j, scale, offset, BITS, ASYMMETRIC, SCALE_IN_LOOP, dtype)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (word_cols * PACK + j)[None, :], mask=x_mask, other=0.0)
        acc += _dot(x, w, FP32)
    return acc


@triton.jit
def _quant_linear_kernel(
    x_ptr, w_ptr, s_ptr, o_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_om,
    BITS: tl.constexpr, GROUP: tl.constexpr, ASYMMETRIC: tl.constexpr, SCALE_IN_LOOP: tl.constexpr,
    HAS_BIAS: tl.constexpr, SILU_AND_MUL: tl.constexpr, FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    PACK: tl.constexpr = 32 // BITS
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, rows < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        word_cols = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
        mask_words = word_cols < K // PACK
        acc = _dequant_dot(acc, x_ptr, w_ptr, s_ptr, o_ptr, offs_m, mask_m, rows, mask_n, word_cols, mask_words,
                           stride_xm, stride_wn, stride_sn, BITS, GROUP, ASYMMETRIC, SCALE_IN_LOOP, FP32)
        if SILU_AND_MUL:  # W is [gate; up]: the up row of output column n is row N + n
            acc_up = _dequant_dot(acc_up, x_ptr, w_ptr, s_ptr, o_ptr, offs_m, mask_m, N + rows, mask_n, word_cols,
                                  mask_words, stride_xm, stride_wn, stride_sn, BITS, GROUP, ASYMMETRIC,
                                  SCALE_IN_LOOP, FP32)
    if not SCALE_IN_LOOP:  # one scale per output channel: applied once, to the sums
        acc *= tl.load(s_ptr + rows * stride_sn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if SILU_AND_MUL:
            acc_up *= tl.load(s_ptr + (N + rows) * stride_sn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if SILU_AND_MUL:
        acc = acc * tl.sigmoid(acc) * acc_up
    out = out_ptr + offs_m[:, None] * stride_om + rows[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _check(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, fmt: PackedFormat) -> int:
    """The weight's K, after checking the tensors agree with the format."""
    n, words = qweight.shape
    k = words * fmt.pack
    if qweight.dtype != torch.int32 or not qweight.is_contiguous():
        raise ValueError("qweight must be contiguous int32 words")
    if fmt.group_size % fmt.pack or k % fmt.group_size:
        raise ValueError(f"group size {fmt.group_size} must divide K {k} and be a multiple of {fmt.pack}")
    if scales.shape != (n, k // fmt.group_size) or not scales.is_contiguous():
        raise ValueError(f"scales {tuple(scales.shape)} do not fit a [{n}, {k}] weight in groups of {fmt.group_size}")
    if fmt.asymmetric != (offsets is not None) or (offsets is not None and offsets.shape != scales.shape):
        raise ValueError("offsets must come with (and only with) an asymmetric format, shaped like scales")
    return k


def quant_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
    fmt: PackedFormat, bias: torch.Tensor | None = None, config: QuantLinearConfig | None = None,
    silu_and_mul: bool = False,
) -> torch.Tensor:
    """x [M, K], M <= MAX_GEMM_TOKENS, rows contiguous; the packed weight [N, K] -> [M, N].

    With `silu_and_mul`, the weight is a gated MLP's merged [gate; up] and the result
    SiLU(x gate^T) * (x up^T), [M, N / 2], the activation applied to the accumulators.
    """
    k = _check(qweight, scales, offsets, fmt)
    n, m = qweight.shape[0], x.shape[0]
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x {tuple(x.shape)} does not fit a [{n}, {k}] weight")
    if m > MAX_GEMM_TOKENS:
        raise ValueError(f"quant_linear takes at most {MAX_GEMM_TOKENS} tokens, got {m}")
    if x.stride(1) != 1 or x.dtype != scales.dtype:
        raise ValueError("x needs contiguous rows and the scales' dtype")
    if silu_and_mul and (n % 2 or bias is not None):
        raise ValueError("silu_and_mul needs a [gate; up] weight of even height and no bias")
    cfg = config or quant_linear_config(m, fmt)
    out_n = n // 2 if silu_and_mul else n
    out = torch.empty(m, out_n, dtype=x.dtype, device=x.device)
    if m:
        _quant_linear_kernel[(triton.cdiv(out_n, cfg.block_n), triton.cdiv(m, cfg.block_m))](
            x, qweight, scales, offsets, bias, out, m, out_n, k, x.stride(0), qweight.stride(0), scales.stride(0),
            out.stride(0), BITS=fmt.bits, GROUP=fmt.group_size, ASYMMETRIC=fmt.asymmetric,
            SCALE_IN_LOOP=fmt.asymmetric or fmt.group_size < k, HAS_BIAS=bias is not None,
            SILU_AND_MUL=silu_and_mul, FP32=x.dtype == torch.float32, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k, NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps, **pdl_launch(x.device),
        )
    return out


@triton.jit
def _dequantize_kernel(
    w_ptr, s_ptr, o_ptr, out_ptr, N, K, stride_wn, stride_sn,
    BITS: tl.constexpr, GROUP: tl.constexpr, ASYMMETRIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):
    PACK: tl.constexpr = 32 // BITS
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    word_cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = (rows < N)[:, None] & (word_cols < K // PACK)[None, :]
    words = tl.load(w_ptr + rows[:, None] * stride_wn + word_cols[None, :], mask=mask, other=0)
    s_offs = rows[:, None] * stride_sn + (word_cols * PACK // GROUP)[None, :]
    scale = tl.load(s_ptr + s_offs, mask=mask, other=0.0)
    offset = tl.load(o_ptr + s_offs, mask=mask, other=0.0) if ASYMMETRIC else None
    for j in tl.static_range(PACK):
        w = _dequantize_codes(words, j, scale, offset, BITS, ASYMMETRIC, True, out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows[:, None] * K + (word_cols * PACK + j)[None, :], w, mask=mask)


def dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, fmt: PackedFormat
) -> torch.Tensor:
    """The packed weight as a [N, K] tensor in the scales' dtype (for cuBLAS at many tokens)."""
    k = _check(qweight, scales, offsets, fmt)
    n = qweight.shape[0]
    out = torch.empty(n, k, dtype=scales.dtype, device=scales.device)
    block_n, block_w = 32, 32
    _dequantize_kernel[(triton.cdiv(n, block_n), triton.cdiv(k // fmt.pack, block_w))](
        qweight, scales, offsets, out, n, k, qweight.stride(0), scales.stride(0),
        BITS=fmt.bits, GROUP=fmt.group_size, ASYMMETRIC=fmt.asymmetric, BLOCK_N=block_n, BLOCK_W=block_w,
    )
    return out
