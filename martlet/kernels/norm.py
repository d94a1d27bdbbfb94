"""RMSNorm, optionally with the residual add fused in. Reference: `martlet.layers.norm.rms_norm`.

One program normalizes all the rows of one token: a single row of a hidden state [T, N], or the
H heads of a per-head norm (Qwen3's QK norm over q [T, H, D], whatever q's token stride). The
fused form reads x and the residual once, adds x into the residual in place and writes the
normalized sum, where the unfused PyTorch spends a pass on the add and two on the norm. In place,
so that the residual stream stays one tensor through the model: a CUDA graph piece can leave it
in a buffer the next piece reads.

`rms_norm_quantized` also quantizes each normalized row to 8-bit codes with one fp32 scale (W8A8's
per-token activations, `martlet.kernels.quantize`) while the row is in registers: the norm's output
never goes to memory in the model's dtype, and no second kernel reads it back. Reference: the
norm, then `martlet.layers.kv_cache.quantize` with fp32 scales.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from martlet.kernels.pdl import pdl_launch, wait_for_previous_kernel
from martlet.kernels.quantize import reciprocal_or_zero, to_codes
from martlet.layers.kv_cache import KVFormat


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, scales_ptr, eps, stride_xt, stride_xh,
    NUM_ROWS: tl.constexpr, N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, MAX_CODE: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    token = tl.program_id(0)
    offs_h = tl.arange(0, BLOCK_H)
    offs_n = tl.arange(0, BLOCK_N)
    mask = (offs_h < NUM_ROWS)[:, None] & (offs_n < N)[None, :]
    x = tl.load(x_ptr + token * stride_xt + offs_h[:, None] * stride_xh + offs_n[None, :], mask=mask, other=0.0)
    # Outputs are contiguous [T, NUM_ROWS, N].
    out_offs = token * NUM_ROWS * N + offs_h[:, None] * N + offs_n[None, :]
    if HAS_RESIDUAL:
        # The residual is contiguous [T, N]: this program alone reads and then writes its row.
        residual = tl.load(residual_ptr + out_offs, mask=mask, other=0.0)
        x = x + residual  # in x's dtype, as the reference adds before normalizing
        tl.store(residual_ptr + out_offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(xf * xf, 1) / N + eps)
    normed = (xf * rstd[:, None]).to(x_ptr.dtype.element_ty)
    weight = tl.load(weight_ptr + offs_n, mask=offs_n < N, other=0.0)
    out = weight.to(tl.float32)[None, :] * normed.to(tl.float32)
    if MAX_CODE > 0:  # out_ptr holds codes: quantize the row as it is in x's dtype, as the reference does
        out = out.to(x_ptr.dtype.element_ty).to(tl.float32)
        scale = tl.max(tl.abs(out), 1) / MAX_CODE
        tl.store(scales_ptr + token * NUM_ROWS + offs_h, scale, mask=offs_h < NUM_ROWS)
        out = to_codes(out, reciprocal_or_zero(scale)[:, None], MAX_CODE, out_ptr.dtype.element_ty)
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """norm(x), or with a residual: residual += x in place, then norm(residual). Over x's last
    dimension; the output is contiguous.

    A 3-D x without residual is taken as [T, H, D] heads, any token stride (no copy); other shapes
    are flattened to rows.
    """
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    _launch(x, weight, eps, residual, out)
    return out


def rms_norm_quantized(
    x: torch.Tensor, weight: torch.Tensor, eps: float, fmt: KVFormat, residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rms_norm` of rows x [T, N] (x's dtype), quantized per row: codes [T, N] in `fmt` and fp32 scales [T]."""
    out = torch.empty(x.shape, dtype=fmt.dtype, device=x.device)
    scales = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    _launch(x, weight, eps, residual, out, scales, fmt.max_code)
    return out, scales


def _launch(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None, out: torch.Tensor,
    scales: torch.Tensor | None = None, max_code: float = 0.0,
) -> None:
    n = x.shape[-1]
    rows = x if x.dim() == 3 and residual is None else x.reshape(-1, 1, n)
    if rows.stride(-1) != 1 or weight.shape != (n,):
        raise ValueError("x needs a contiguous last dimension and weight one entry per element of it")
    num_tokens, num_rows = rows.shape[:2]
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or not residual.is_contiguous()):
        raise ValueError("residual must be contiguous and match x in shape and dtype")
    if num_tokens:
        block_n = triton.next_power_of_2(n)
        block_h = triton.next_power_of_2(num_rows)
        _rms_norm_kernel[(num_tokens,)](
            rows, residual, weight, out, scales, eps, rows.stride(0), rows.stride(1),
            NUM_ROWS=num_rows, N=n, BLOCK_H=block_h, BLOCK_N=block_n, HAS_RESIDUAL=residual is not None,
            MAX_CODE=max_code, num_warps=min(max(block_h * block_n // 512, 1), 16), **pdl_launch(x.device),
        )
