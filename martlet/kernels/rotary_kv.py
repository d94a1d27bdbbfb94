"""Rotary embedding on q and k, and the store of k and v into the paged cache, in one kernel.

References: `martlet.layers.rotary.apply_rotary` and `martlet.layers.attention.write_kv_cache`.
A program handles one token's KV heads (all, or one) and the query heads of their groups: the
rotated k goes straight to the cache without a round trip through memory. Long prefills give a
program every head of its token, so the token's cos/sin row is read once; a decode batch is a few
dozen to a few hundred tokens, and a program a token would leave most SMs idle (at batch 32 over an
int8 cache, 10 us a layer against 5.3 with a program a head), so it takes a program per head.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from martlet.device import num_sms
from martlet.kernels.paged import cache_strides, check_cache, scale_args
from martlet.kernels.pdl import pdl_launch, wait_for_previous_kernel
from martlet.kernels.quantize import reciprocal_or_zero, to_codes
from martlet.layers.kv_cache import LayerKV


@triton.jit
def _rotate(row_ptr, stride_h, heads, heads_end, offs_d, d_mask, cos, sin, HALF: tl.constexpr):
    """Neox rotary of one token's `heads` below `heads_end`: (x1 cos - x2 sin, x2 cos + x1 sin), fp32."""
    mask = (heads < heads_end)[:, None] & d_mask[None, :]
    ptrs = row_ptr + heads[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin, mask


@triton.jit
def _store_halves(ptrs, x1, x2, mask, second_half):
    """x1 at `ptrs`, x2 `second_half` elements on (HALF times the channel stride)."""
    tl.store(ptrs, x1.to(ptrs.dtype.element_ty), mask=mask)
    tl.store(ptrs + second_half, x2.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _store_quantized(ptrs, scale_ptrs, x1, x2, mask, head_mask, second_half, MAX_CODE: tl.constexpr):
    """Head rows (halves x1, x2, fp32) as 8-bit codes and one fp16 scale each: `kv_cache.quantize`,
    the same operations in the same order."""
    amax = tl.maximum(tl.max(tl.abs(x1), 1), tl.max(tl.abs(x2), 1))
    scale = (amax / MAX_CODE).to(tl.float16)
    inv = reciprocal_or_zero(scale.to(tl.float32))[:, None]
    tl.store(scale_ptrs, scale, mask=head_mask)
    y1 = to_codes(x1, inv, MAX_CODE, ptrs.dtype.element_ty)
    y2 = to_codes(x2, inv, MAX_CODE, ptrs.dtype.element_ty)
    _store_halves(ptrs, y1, y2, mask, second_half)


@triton.jit
def _rotary_kv_kernel(
    q_ptr, k_ptr, v_ptr, positions_ptr, cos_sin_ptr, slot_mapping_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
    k_scale_ptr, v_scale_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_cos,
    stride_block, stride_head, stride_slot, stride_v_slot, stride_v_d, stride_scale_block, stride_scale_head,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr, QUANT: tl.constexpr,
    MAX_CODE: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    token = tl.program_id(0)
    first_kv_head = tl.program_id(1) * BLOCK_HKV  # this program's KV heads, then their groups' query heads
    GROUP: tl.constexpr = NUM_Q_HEADS // NUM_KV_HEADS
    offs_d = tl.arange(0, BLOCK_HALF)
    d_mask = offs_d < HALF
    pos = tl.load(positions_ptr + token)
    cos = tl.load(cos_sin_ptr + pos * stride_cos + offs_d, mask=d_mask, other=0.0)[None, :]
    sin = tl.load(cos_sin_ptr + pos * stride_cos + HALF + offs_d, mask=d_mask, other=0.0)[None, :]

    q_heads = first_kv_head * GROUP + tl.arange(0, BLOCK_HQ)
    q_end = tl.minimum((first_kv_head + BLOCK_HKV) * GROUP, NUM_Q_HEADS)
    q1, q2, q_mask = _rotate(q_ptr + token * stride_qt, stride_qh, q_heads, q_end, offs_d, d_mask, cos, sin, HALF)
    q_out = q_out_ptr + token * stride_ot + q_heads[:, None] * stride_oh + offs_d[None, :]
    _store_halves(q_out, q1, q2, q_mask, HALF)

    # A negative slot marks a padding token (e.g. in a CUDA graph's batch): rotate its q, store nothing.
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:
        kv_heads = first_kv_head + tl.arange(0, BLOCK_HKV)
        k1, k2, kv_mask = _rotate(k_ptr + token * stride_kt, stride_kh, kv_heads, NUM_KV_HEADS, offs_d, d_mask, cos,
                                  sin, HALF)
        tiles = (slot // BLOCK_SIZE) * stride_block + kv_heads[:, None] * stride_head
        k_offs = tiles + (slot % BLOCK_SIZE) * stride_slot + offs_d[None, :]
        k_cache = k_cache_ptr + k_offs
        if QUANT:
            v_cache = v_cache_ptr + tiles + (slot % BLOCK_SIZE) * stride_v_slot + offs_d[None, :] * stride_v_d
        else:  # a 16-bit cache's V is laid out as its K (`cache_strides`): K's offsets
            v_cache = v_cache_ptr + k_offs
        # Round to k's dtype before the cache's, as the reference does (rotary output, then the write).
        k_dtype = k_ptr.dtype.element_ty
        k1, k2 = k1.to(k_dtype), k2.to(k_dtype)
        v = v_ptr + token * stride_vt + kv_heads[:, None] * stride_vh + offs_d[None, :]
        v1, v2 = tl.load(v, mask=kv_mask, other=0.0), tl.load(v + HALF, mask=kv_mask, other=0.0)
        if QUANT:
            scales = (slot // BLOCK_SIZE) * stride_scale_block + slot % BLOCK_SIZE + kv_heads * stride_scale_head
            head_mask = kv_heads < NUM_KV_HEADS
            _store_quantized(k_cache, k_scale_ptr + scales, k1.to(tl.float32), k2.to(tl.float32), kv_mask, head_mask,
                             HALF, MAX_CODE)
            _store_quantized(v_cache, v_scale_ptr + scales, v1.to(tl.float32), v2.to(tl.float32), kv_mask, head_mask,
                             HALF * stride_v_d, MAX_CODE)
        else:
            _store_halves(k_cache, k1, k2, kv_mask, HALF)
            _store_halves(v_cache, v1, v2, kv_mask, HALF)


def rotary_kv_write(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
    kv: LayerKV, slot_mapping: torch.Tensor, q_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate q and k ([T, H, D], any token/head strides) at `positions`; store k and v at `slot_mapping`
    (as codes and scales in an 8-bit cache).

    Returns the rotated q, contiguous [T, Hq, D] (written into `q_out` if given).
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    check_cache(kv)
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("q, k, v and cos_sin_cache need a contiguous last dimension")
    if q_out is None:
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return q_out
    half = head_dim // 2
    fmt = kv.format
    k_scale, v_scale, stride_scale_block, stride_scale_head = scale_args(kv)
    # Every KV head of a token in one program when the tokens alone put several programs on every SM,
    # else a program a head: two compiled variants, both built before serving starts (decode graphs, the
    # largest step), since one first met mid-serving would stall it to compile.
    block_hkv = triton.next_power_of_2(num_kv_heads)
    kv_heads_per_program = block_hkv if num_tokens >= 4 * num_sms(q.device) else 1
    group = num_q_heads // num_kv_heads
    grid = (num_tokens, triton.cdiv(num_kv_heads, kv_heads_per_program))
    _rotary_kv_kernel[grid](
        q, k, v, positions, cos_sin_cache, slot_mapping, q_out, kv.k, kv.v, k_scale, v_scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        q_out.stride(0), q_out.stride(1), cos_sin_cache.stride(0),
        *cache_strides(kv), stride_scale_block, stride_scale_head,
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HALF=half, BLOCK_SIZE=kv.k.shape[2],
        BLOCK_HQ=min(triton.next_power_of_2(kv_heads_per_program * group), triton.next_power_of_2(num_q_heads)),
        BLOCK_HKV=kv_heads_per_program, BLOCK_HALF=triton.next_power_of_2(half), QUANT=fmt is not None,
        MAX_CODE=fmt.max_code if fmt else 0.0, num_warps=4 if kv_heads_per_program == block_hkv else 1,
        **pdl_launch(q.device),
    )
    return q_out
